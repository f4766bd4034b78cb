"""A corpus of hostile trigger params: each is refused by prepare, with a clear error, before
any workspace is written or any container starts.

The form and the REST trigger validate params against the DAG's schema first
(tests/pipeline/test_dag.py); these go to ``workspace.prepare`` directly, as a conf that
skipped that validation would (``airflow dags test``, a DB-inserted run, a future form bug).
"""

from __future__ import annotations

import ast
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
    links = {"file": data_root / "innocent.jsonl", "dir": data_root / "innocent-dir",
             "model": config.models_dir() / "innocent-model"}
    for link, target in ((links["file"], outside / "stolen.jsonl"), (links["dir"], outside),
                         (links["model"], outside / "model")):
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
    ({"dataset_path": "examples/data"}, "not CSV, JSONL or Parquet"),
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


@pytest.mark.parametrize(("override", "says"), HOSTILE, ids=[f"{i:02d}-{next(iter(o))}" for i, (o, _) in enumerate(HOSTILE)])
def test_hostile_param_is_refused_before_anything_is_written(override, says, traps, tiny_model):
    override = {k: _untrap(v, traps) for k, v in override.items()}
    conf = {"dataset_path": str(SAMPLE_CHAT), "base_model": "tiny-llama", "data_format": "chat", "runtime": "docker", **override}
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
    for path in [*REPO.joinpath("plugins").rglob("*.py"), *REPO.joinpath("dags").rglob("*.py"),
                 *REPO.joinpath("trainer_image").rglob("*.py"), *REPO.joinpath("scripts").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "shell" and getattr(node.value, "value", False) is not False:
                offenders.append(f"{path}:{node.lineno} shell=")
            if isinstance(node, ast.Attribute) and node.attr in ("system", "popen") and getattr(node.value, "id", "") == "os":
                offenders.append(f"{path}:{node.lineno} os.{node.attr}")
    assert offenders == []
