"""A version's base model travels: recorded as cache name + weights hash, found on any host, refused when it differs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from loraflow.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def docker_style(train_version, tmp_path_factory) -> dict:
    """A version trained on ``<other cache>/tiny-llama`` (a container's ``/models/tiny-llama``), that cache gone."""
    container_models = tmp_path_factory.mktemp("container") / "models"
    container_models.mkdir()
    version = train_version("portable-base-demo", models_root=container_models)
    shutil.rmtree(container_models)
    return {"name": "portable-base-demo", "version": version, "trained_at": str(container_models / "tiny-llama")}


def test_docker_style_version_loads_with_plain_mlflow_pyfunc_from_the_host_cache(
    docker_style, mlflow_server, monkeypatch
):
    import mlflow
    import yaml
    from mlflow.artifacts import download_artifacts

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    uri = f"models:/{docker_style['name']}/{docker_style['version']}"
    mlmodel = yaml.safe_load(Path(download_artifacts(f"{uri}/MLmodel")).read_text())
    assert mlmodel["flavors"]["transformers"]["local_base_model_path"] == docker_style["trained_at"]  # not on this host
    assert not Path(docker_style["trained_at"]).exists()

    model = mlflow.pyfunc.load_model(uri)  # resolved from $LORAFLOW_MODELS/tiny-llama, hash verified
    assert type(model.get_raw_model().model).__name__.startswith("Peft")
    [completion] = model.predict(["What is 3 plus 4?"], params={"max_new_tokens": 6})
    assert isinstance(completion, str) and not completion.startswith("What is 3 plus 4?")  # the completion only


def test_a_base_whose_weights_changed_is_refused_with_expected_and_found_hashes(
    docker_style, mlflow_server, tiny_model, monkeypatch, tmp_path, capsys
):
    import mlflow
    from safetensors.torch import load_file, save_file

    from loraflow_trainer.base_model import BaseModelError, weights_sha256

    changed = tmp_path / "models" / "tiny-llama"
    shutil.copytree(tiny_model, changed)
    tensors = load_file(changed / "model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 0.01  # same shapes and names, different weights
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    expected, found = weights_sha256(tiny_model), weights_sha256(changed)
    assert expected != found

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("LORAFLOW_MODELS", str(tmp_path / "models"))
    with pytest.raises(Exception) as refused:  # noqa: B017 - the loader is the copy bundled in the model (code/)
        mlflow.pyfunc.load_model(f"models:/{docker_style['name']}/{docker_style['version']}")
    assert type(refused.value).__name__ == BaseModelError.__name__
    message = str(refused.value)
    assert (
        expected in message and found in message and str(changed) in message and docker_style["trained_at"] in message
    )

    code = main(
        [
            "models",
            "generate",
            f"{docker_style['name']}/{docker_style['version']}",
            "--prompt",
            "hi",
            "--base-model-path",
            str(changed),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and expected in err and found in err and "pass --base-model-path DIR" in err


def test_registered_versions_record_the_base_portably_and_the_code_that_trained_them(
    registered, tiny_model, capsys, tmp_path
):
    from loraflow_trainer.base_model import weights_sha256

    code = main(["models", "show", f"{registered['name']}@champion", "--json"])
    lineage = json.loads(capsys.readouterr().out)["lineage"]
    assert code == 0
    assert lineage["base_ref"] == "tiny-llama" and lineage["base_sha256"] == weights_sha256(tiny_model)
    assert lineage["loraflow_version"] and lineage["trainer_version"]
    assert re.fullmatch(r"[0-9a-f]{40}", lineage["git_commit"]) and re.fullmatch(
        r"[0-9a-f]{40}", lineage["trainer_git_commit"]
    )

    main(["models", "pull", f"{registered['name']}@champion", "--dest", str(tmp_path / "pulled")])
    capsys.readouterr()
    metadata = json.loads((tmp_path / "pulled" / "metadata.json").read_text())
    assert (
        metadata["base_model_ref"]["name"] == "tiny-llama"
        and metadata["code"]["git_commit"] == lineage["trainer_git_commit"]
    )
