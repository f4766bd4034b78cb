"""``loraflow models ...`` against a version a real pipeline run registered in a real MLflow server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow.cli import main
from loraflow.registry import Ref

pytestmark = pytest.mark.slow


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_references_are_parsed_as_people_write_them():
    assert Ref.parse("my-model@champion") == Ref("my-model", alias="champion")
    assert Ref.parse("org.team.model/12") == Ref("org.team.model", version="12")
    assert Ref.parse("my-model") == Ref("my-model")


def test_list_shows_versions_with_aliases_metrics_and_lineage(registered, capsys):
    code, out, _ = run_cli(capsys, "models", "list", "--name", registered["name"], "--json")
    assert code == 0
    [model] = json.loads(out)
    [version] = model["versions"]
    assert model["aliases"]["champion"] == registered["version"]
    assert {"champion", "challenger"} <= set(version["aliases"])
    assert version["lineage"]["run_key"] == registered["run_key"]
    assert version["lineage"]["dag_id"] == "loraflow_finetune" and len(version["lineage"]["data_fingerprint"]) == 64
    assert version["lineage"]["base_model"].endswith("tiny-llama")
    assert version["metrics"]["eval_loss"] > 0
    assert version["run_url"].endswith(f"/runs/{registered['mlflow_run_id']}")

    code, table, _ = run_cli(capsys, "models", "list")  # the human table
    assert code == 0
    row = next(line for line in table.splitlines() if line.startswith(registered["name"]))
    assert "champion" in row and "eval_loss=" in row and registered["run_key"] in row


def test_show_by_alias_and_by_version_agree(registered, capsys):
    _, by_alias, _ = run_cli(capsys, "models", "show", f"{registered['name']}@champion", "--json")
    _, by_version, _ = run_cli(capsys, "models", "show", f"{registered['name']}/{registered['version']}", "--json")
    assert (
        json.loads(by_alias)["mlflow_run_id"] == json.loads(by_version)["mlflow_run_id"] == registered["mlflow_run_id"]
    )


@pytest.mark.parametrize(
    "ref, says",
    [
        ("{name}@production-eu", "has no alias 'production-eu' (aliases: challenger, champion)"),
        ("{name}/99", "has no version 99 (versions: 1)"),
        ("no-such-model@champion", "no registered model named 'no-such-model'"),
    ],
)
def test_unknown_names_aliases_and_versions_say_what_exists(registered, capsys, ref, says):
    code, out, err = run_cli(capsys, "models", "show", ref.format(name=registered["name"]))
    assert code == 1 and out == ""
    assert says in err and err.startswith("loraflow: error:")


def test_unreachable_tracking_server_fails_fast_with_the_fix(registered, free_dead_uri):
    proc = subprocess.run(
        [sys.executable, "-m", "loraflow.cli", "--tracking-uri", free_dead_uri, "models", "list"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3
    assert f"cannot reach the MLflow tracking server at {free_dead_uri}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_pull_writes_adapter_schema_metrics_and_metadata(registered, capsys, tmp_path):
    dest = tmp_path / "pulled"
    code, out, _ = run_cli(capsys, "models", "pull", f"{registered['name']}@champion", "--dest", str(dest), "--json")
    assert code == 0
    info = json.loads(out)
    assert (dest / "model" / "MLmodel").exists()
    assert (dest / "model" / "peft" / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((dest / "metrics.json").read_text())["eval_loss"] == pytest.approx(info["metrics"]["eval_loss"])
    assert "checksums" in json.loads((dest / "metadata.json").read_text())
    assert json.loads((dest / "dataset_schema.json").read_text())
    assert Path(info["base_model_path"]).name == "tiny-llama"
    assert json.loads((dest / "version.json").read_text())["version"] == registered["version"]

    code, _, err = run_cli(capsys, "models", "pull", f"{registered['name']}@champion", "--dest", str(dest))
    assert code == 1 and "is not empty" in err  # never overwrites a pulled model


def test_promote_moves_the_alias_and_records_who_and_why(registered, capsys):
    name, version = registered["name"], registered["version"]
    code, out, _ = run_cli(
        capsys,
        "models",
        "promote",
        name,
        version,
        "--alias",
        "production",
        "--reason",
        "passed the offline eval",
        "--json",
    )
    assert code == 0
    from mlflow import MlflowClient

    mc = MlflowClient(tracking_uri=registered["tracking_uri"], registry_uri=registered["tracking_uri"])
    mv = mc.get_model_version_by_alias(name, "production")
    assert mv.version == version
    assert mv.tags["loraflow.promotion_reason"] == "passed the offline eval" and mv.tags["loraflow.promoted_by"]

    code, _, err = run_cli(capsys, "models", "promote", name, "42", "--alias", "production", "--reason", "x")
    assert code == 1 and "has no version 42" in err
    assert mc.get_model_version_by_alias(name, "production").version == version


def test_generate_loads_base_and_adapter_and_completes_a_prompt(registered, capsys):
    code, out, err = run_cli(
        capsys,
        "models",
        "generate",
        f"{registered['name']}@champion",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "8",
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["adapter"].startswith("Peft")  # the LoRA adapter is on the base model
    assert result["completion"].strip() and result["device"] in ("cpu", "cuda:0")  # GPU when there is one


def test_generate_without_the_base_model_names_the_flag_to_pass(registered, capsys, tmp_path):
    code, _, err = run_cli(
        capsys,
        "models",
        "generate",
        f"{registered['name']}@champion",
        "--prompt",
        "hi",
        "--base-model-path",
        str(tmp_path / "missing"),
    )
    assert code == 1 and "pass --base-model-path DIR" in err
