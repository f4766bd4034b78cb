"""A corpus of hostile trigger params: each is refused by prepare, with a clear error, before
any workspace is written or any container starts.

The form and the REST trigger validate params against the DAG's schema first
(tests/pipeline/test_dag.py); these go to ``workspace.prepare`` directly, as a conf that
skipped that validation would (``airflow dags test``, a DB-inserted run, a future form bug).
"""

from __future__ import annotations

import ast
import json
import os
import stat
from pathlib import Path

import pytest

from loraflow import config, workspace
from loraflow.errors import ParamsError
from tests.conftest import REPO, SAMPLE_CHAT


@pytest.fixture(scope="module")
def traps(tmp_path_factory) -> dict[str, str]:
    """Symlinks planted inside the allowed roots that point outside them."""
    data_root = config.data_roots()[0]
    data_root.mkdir(parents=True, exist_ok=True)
    outside = tmp_path_factory.mktemp("outside")
    (outside / "stolen.jsonl").write_text('{"text": "secret"}\n')
    (outside / "model").mkdir()
    (outside / "model" / "config.json").write_text("{}")
    links = {
        "file": data_root / "innocent.jsonl",
        "dir": data_root / "innocent-dir",
        "model": config.models_dir() / "innocent-model",
    }
    for link, target in (
        (links["file"], outside / "stolen.jsonl"),
        (links["dir"], outside),
        (links["model"], outside / "model"),
    ):
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(target)
    return {k: str(v) for k, v in links.items()}


HOSTILE = [
    # dataset paths: traversal, absolute, URLs, home, NUL, devices, directories
    ({"dataset_path": "../../../../etc/passwd"}, "dataset_path"),
    ({"dataset_path": "/etc/passwd"}, "outside the allowed roots"),
    ({"dataset_path": "file:///etc/passwd"}, "not a URL"),
    ({"dataset_path": "http://169.254.169.254/latest/meta-data"}, "not a URL"),
    ({"dataset_path": "s3://bucket/data.jsonl"}, "not a URL"),
    ({"dataset_path": "~/.ssh/id_rsa"}, "dataset_path"),
    ({"dataset_path": "examples/data/../../../../etc/shadow"}, "dataset_path"),
    ({"dataset_path": "examples/data/sample_chat.jsonl\x00.png"}, "plain file path"),
    ({"dataset_path": "/dev/zero"}, "outside the allowed roots"),
    ({"dataset_path": "/proc/self/environ"}, "outside the allowed roots"),
    ({"dataset_path": "examples/data"}, "is a directory, not a regular file"),
    ({"dataset_path": "$(cat /etc/passwd)"}, "dataset_path"),
    ({"dataset_path": "TRAP:file"}, "outside the allowed roots"),
    ({"dataset_path": "TRAP:dir/stolen.jsonl"}, "outside the allowed roots"),
    ({"eval_dataset_path": "/etc/hosts"}, "eval_dataset_path"),
    # base models: traversal, absolute paths, URLs, shell, symlink escapes
    ({"base_model": "../../../../etc"}, "base_model"),
    ({"base_model": "/etc"}, "base_model"),
    ({"base_model": "/"}, "base_model"),
    ({"base_model": "https://huggingface.co/org/model"}, "not a URL"),
    ({"base_model": "org/model; rm -rf /"}, "base_model"),
    ({"base_model": "org/../../etc"}, "base_model"),
    ({"base_model": "--help"}, "base_model"),
    ({"base_model": "a/b/c"}, "base_model"),
    ({"base_model": "TRAP:model"}, "outside the allowed roots"),
    # pipeline settings that reach the container's configuration
    ({"gpus": "all; rm -rf /"}, "gpus"),
    ({"gpus": "0,$(reboot)"}, "gpus"),
    ({"gpus": "device=0 --privileged"}, "gpus"),
    ({"memory_limit": "1g; ls"}, "memory_limit"),
    ({"memory_limit": "-1g"}, "memory_limit"),
    ({"shm_size": "99999999999g"}, "shm_size"),
    ({"runtime": "sh"}, "runtime"),
    ({"registered_model_name": "../../other-team-model"}, "registered_model_name"),
    ({"registered_model_name": "x' OR '1'='1"}, "registered_model_name"),
    # job spec fields: types, ranges, unknown names (a "command" param does not exist)
    ({"command": ["sh", "-c", "id"]}, "command"),
    ({"output_dir": "/etc"}, "output_dir"),
    ({"max_seq_length": 10**12}, "max_seq_length"),
    ({"learning_rate": "1e-4; drop"}, "learning_rate"),
    ({"data_format": "{{ ''.__class__ }}"}, "data_format"),
]


@pytest.mark.parametrize(
    ("override", "says"), HOSTILE, ids=[f"{i:02d}-{next(iter(o))}" for i, (o, _) in enumerate(HOSTILE)]
)
def test_hostile_param_is_refused_before_anything_is_written(override, says, traps, tiny_model):
    override = {k: _untrap(v, traps) for k, v in override.items()}
    conf = {
        "dataset_path": str(SAMPLE_CHAT),
        "base_model": "tiny-llama",
        "data_format": "chat",
        "runtime": "docker",
        **override,
    }
    run_id = f"hostile__{abs(hash(repr(override)))}"
    with pytest.raises(ParamsError) as err:
        workspace.prepare(conf, config.DAG_ID, run_id, "manual")
    assert says in str(err.value), str(err.value)
    assert len(str(err.value)) < 1000
    assert not workspace.run_dir(config.DAG_ID, run_id).exists()  # nothing written, so nothing can run


def _untrap(value, traps: dict[str, str]):
    """'TRAP:file' -> the planted symlink; 'TRAP:dir/x' -> a path through the planted dir link."""
    if not (isinstance(value, str) and value.startswith("TRAP:")):
        return value
    name, _, rest = value[5:].partition("/")
    return traps[name] + (f"/{rest}" if rest else "")


def test_the_same_params_without_the_trap_are_accepted(tiny_model):
    """The corpus's baseline conf is valid: every refusal above is the hostile value's doing."""
    conf = {"dataset_path": str(SAMPLE_CHAT), "base_model": "tiny-llama", "data_format": "chat", "runtime": "docker"}
    pipeline = workspace.prepare(conf, config.DAG_ID, "hostile__baseline", "manual")
    assert Path(pipeline.workspace, "job.json").is_file()


def test_no_code_runs_a_shell():
    """Commands are argument lists everywhere: no shell=True, os.system or os.popen in the source."""
    offenders = []
    for path in [
        *REPO.joinpath("plugins").rglob("*.py"),
        *REPO.joinpath("dags").rglob("*.py"),
        *REPO.joinpath("trainer_image").rglob("*.py"),
        *REPO.joinpath("scripts").rglob("*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.keyword)
                and node.arg == "shell"
                and getattr(node.value, "value", False) is not False
            ):
                offenders.append(f"{path}:{node.lineno} shell=")
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("system", "popen")
                and getattr(node.value, "id", "") == "os"
            ):
                offenders.append(f"{path}:{node.lineno} os.{node.attr}")
    assert offenders == []


# --- Only the form's settings, each within its schema (issue 11, points 2 and 7) -----------------


def _schema_breakers() -> list[tuple[dict, str]]:
    """Every form param given values its schema refuses: past each bound, outside its enum or
    pattern, of the wrong type. Built from the form itself, so a new param is covered too."""
    from loraflow import params

    cases = []
    for name, param in params.build_params().items():
        s = param.schema
        bounds = {k: v for part in s.get("allOf", []) for k, v in part.items()}
        bounds.update({k: s[k] for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") if k in s})
        types = s.get("type") if isinstance(s.get("type"), list) else [s.get("type")]
        if "maximum" in bounds:
            cases.append(({name: bounds["maximum"] * 10 + 1}, name))
        if "exclusiveMaximum" in bounds:
            cases.append(({name: bounds["exclusiveMaximum"]}, name))
        if "minimum" in bounds:
            cases.append(({name: bounds["minimum"] - 1}, name))
        if "exclusiveMinimum" in bounds:
            cases.append(({name: bounds["exclusiveMinimum"]}, name))
        if "enum" in s:
            cases.append(({name: "not-one-of-them"}, name))
        if "pattern" in s:
            cases.append(({name: "$(id)"}, name))
        cases.append(({name: {"nested": "object"}}, name))  # no param takes an object
        if "string" not in types:
            cases.append(({name: "ten"}, name))
    return cases


def _not_form_params() -> list[tuple[dict, str]]:
    """Every job spec field the form does not show (spec-only), plus names nothing knows."""
    from loraflow import params
    from loraflow_trainer import spec

    cases = [({name: "x"}, name) for name in sorted(spec.SECTION_OF) if name not in params.form_names()]
    cases += [
        ({"trust_remote_code": True}, "LORAFLOW_TRUST_REMOTE_CODE"),
        ({"train_path": "/etc/passwd"}, "dataset_path"),
        ({"prompt_column": "question"}, "prompt_column"),
        ({"labels": {"dag_id": "other"}}, "labels"),
        ({"spec_version": 99}, "spec_version"),
        ({"data_fingerprint": "0" * 64}, "data_fingerprint"),
        ({"model": {"trust_remote_code": True}}, "model"),
        ({"__class__": 1}, "__class__"),
        ({"": 1}, "''"),
        ({"x" * 500: 1}, "xxxx"),
        ({"params": {"lora_r": 8}}, "params"),
        ({"max_steps ": 5}, "max_steps "),
        ({"MAX_STEPS": 5}, "MAX_STEPS"),
        ({"lora-r": 8}, "lora-r"),
    ]
    return cases


CONF_CORPUS = (
    _schema_breakers()
    + _not_form_params()
    + [
        ({"max_steps": 10**7}, "max_steps"),
        ({"max_steps": 1_000_001}, "max_steps"),
        ({"seed": 2**32}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -1}, "seed"),
        ({"eval_fraction": 0.9}, "eval_fraction"),
        ({"min_rows": 0}, "min_rows"),
        ({"promotion_metric": "accuracy"}, "promotion_metric"),
    ]
)


@pytest.mark.parametrize(
    ("override", "says"),
    CONF_CORPUS,
    ids=[f"{i:03d}-{str(next(iter(o)))[:20]}" for i, (o, _) in enumerate(CONF_CORPUS)],
)
def test_a_conf_outside_the_form_is_refused_by_prepare(override, says, tiny_model):
    conf = {"dataset_path": str(SAMPLE_CHAT), "base_model": "tiny-llama", "data_format": "chat", **override}
    run_id = f"conf__{abs(hash(repr(sorted(override.items(), key=str))))}"
    with pytest.raises(ParamsError) as err:
        workspace.prepare(conf, config.DAG_ID, run_id, "manual")
    assert says in str(err.value), str(err.value)
    assert len(str(err.value)) < 1500
    assert not workspace.run_dir(config.DAG_ID, run_id).exists()


def test_one_message_names_every_key_that_is_not_a_form_param(tiny_model):
    conf = {
        "dataset_path": str(SAMPLE_CHAT),
        "base_model": "tiny-llama",
        "trust_remote_code": True,
        "prompt_column": "q",
        "eval_path": "x.parquet",
        "command": "id",
    }
    with pytest.raises(ParamsError) as err:
        workspace.prepare(conf, config.DAG_ID, "conf__many", "manual")
    msg = str(err.value)
    assert all(repr(k) in msg for k in ("trust_remote_code", "prompt_column", "eval_path", "command")), msg
    assert "4 name(s)" in msg and "README" in msg and "LORAFLOW_TRUST_REMOTE_CODE" in msg


def test_keys_only_in_the_raw_trigger_conf_are_refused_too(tiny_model):
    """Were Airflow told not to merge the conf into the params, the conf's own names are still checked."""
    conf = {"dataset_path": str(SAMPLE_CHAT), "base_model": "tiny-llama"}
    with pytest.raises(ParamsError, match="'trust_remote_code'"):
        workspace.prepare(conf, config.DAG_ID, "conf__raw", "manual", raw_keys=["dataset_path", "trust_remote_code"])


def test_the_form_names_are_the_names_prepare_accepts(tiny_model):
    """Every form param at a valid value is accepted, and the largest max_steps and seed are fine."""
    from loraflow import params

    assert params.form_names() == frozenset(params.build_params())
    conf = {name: p.value for name, p in params.build_params().items()}
    conf.update(
        dataset_path=str(SAMPLE_CHAT), base_model="tiny-llama", data_format="chat", max_steps=1_000_000, seed=2**32 - 1
    )
    pipeline = workspace.prepare(conf, config.DAG_ID, "conf__all-form-params", "manual")
    job = workspace.load_job(pipeline.workspace)
    assert job.training.max_steps == 1_000_000 and job.training.seed == 2**32 - 1


def test_trust_remote_code_comes_from_the_deployment_only(tiny_model, monkeypatch):
    conf = {"dataset_path": str(SAMPLE_CHAT), "base_model": "tiny-llama"}
    monkeypatch.delenv("LORAFLOW_TRUST_REMOTE_CODE", raising=False)
    off = workspace.prepare(conf, config.DAG_ID, "trust__off", "manual")
    monkeypatch.setenv("LORAFLOW_TRUST_REMOTE_CODE", "true")
    on = workspace.prepare(conf, config.DAG_ID, "trust__on", "manual")
    assert workspace.load_job(off.workspace).model.trust_remote_code is False
    assert workspace.load_job(on.workspace).model.trust_remote_code is True


# --- Dataset paths that are not regular files (issue 11, point 5) --------------------------------


def _odd_file(kind: str, root: Path) -> str:
    path = root / f"odd-{kind}.jsonl"
    if path.exists() or path.is_symlink():
        return str(path)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    elif kind == "loop":
        (root / "odd-loop-b.jsonl").symlink_to(path)
        path.symlink_to(root / "odd-loop-b.jsonl")
    elif kind == "device":
        if os.geteuid() != 0:
            pytest.skip("creating a device node needs root (CI runs as root)")
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's major/minor
    elif kind == "devnull-link":
        path.symlink_to("/dev/null")
    elif kind == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads every file")
        path.write_text('{"text": "x"}\n')
        path.chmod(0)
    elif kind == "socket":
        import socket

        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
    return str(path)


ODD_FILES = [
    ("fifo", "named pipe"),
    ("dir", "directory"),
    ("loop", "symlink loop"),
    ("device", "device"),
    ("devnull-link", "outside the allowed roots"),
    ("socket", "socket"),
    ("unreadable", "not readable"),
]


@pytest.mark.parametrize(("kind", "says"), ODD_FILES, ids=[k for k, _ in ODD_FILES])
@pytest.mark.parametrize("param", ["dataset_path", "eval_dataset_path"])
def test_a_dataset_path_that_is_not_a_regular_file_is_refused_by_prepare(kind, says, param, data_dir, tiny_model):
    path = _odd_file(kind, data_dir)
    conf = {"dataset_path": str(SAMPLE_CHAT), "base_model": "tiny-llama", param: path}
    run_id = f"odd__{kind}__{param}"
    with pytest.raises(ParamsError) as err:
        workspace.prepare(conf, config.DAG_ID, run_id, "manual")
    assert says in str(err.value) and param in str(err.value), str(err.value)
    assert not workspace.run_dir(config.DAG_ID, run_id).exists()


@pytest.mark.parametrize("name", ["upper.JSONL", "mixed.JsonL", "upper.CSV", "upper.PARQUET"])
def test_dataset_suffixes_in_any_case_are_accepted(name, data_dir, tiny_model):
    import pandas as pd

    path = data_dir / name
    rows = [json.loads(line) for line in SAMPLE_CHAT.read_text().splitlines()]
    if name.lower().endswith(".jsonl"):
        path.write_bytes(SAMPLE_CHAT.read_bytes())
    elif name.lower().endswith(".csv"):
        pd.DataFrame({"messages": [json.dumps(r["messages"]) for r in rows]}).to_csv(path, index=False)
    else:
        pd.DataFrame({"messages": [json.dumps(r["messages"]) for r in rows]}).to_parquet(path)
    pipeline = workspace.prepare(
        {"dataset_path": str(path), "base_model": "tiny-llama", "data_format": "chat"},
        config.DAG_ID,
        f"suffix__{name}",
        "manual",
    )
    assert pipeline.dataset_path == str(path)
