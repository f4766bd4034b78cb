"""A model name or run key finds the same version and run on the register path and on the lookup path.

Both paths put values into MLflow filter strings through one function
(``registry.client.equals``). The trigger form allows letters, digits, ``.``, ``_`` and
``-`` in a model name; ``loraflow models show NAME`` and ``export --register-name`` take
any name MLflow takes, quotes included. Against the session's real MLflow server.
"""

from __future__ import annotations

import contextlib
import re

from mlflow.exceptions import MlflowException

from loraflow import registry
from loraflow.params import MODEL_NAME_PATTERN

FORM_NAME = "Org.team_model-v1.2"  # every kind of character the form allows
QUOTED = 'o\'brien "q" model'  # both quotes: no quoting MLflow's parser reads back exactly
DECOY = "o_brien _q_ model"  # what the LIKE pattern written for QUOTED also matches


def _add_version(mc, name: str, run_key: str) -> str:
    with contextlib.suppress(MlflowException):  # it exists already
        mc.create_registered_model(name)
    exp = mc.get_experiment_by_name(registry.experiment_name(name))
    exp_id = exp.experiment_id if exp else mc.create_experiment(registry.experiment_name(name))
    run = mc.create_run(exp_id, tags={registry.RUN_KEY: run_key})
    return mc.create_model_version(
        name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags={registry.RUN_KEY: run_key}
    ).version


def _assert_one_version_on_both_paths(uri: str, mc, name: str) -> None:
    key = f"loraflow_finetune/{name} run"
    version = _add_version(mc, name, key)
    # register's path: the version and the MLflow run of this run key
    assert registry.registered_version(uri, name, key) == version
    run_id = registry.ensure_run(uri, name, key, {})
    assert registry.ensure_run(uri, name, key, {}) == run_id  # found again, not created twice
    # the lookup path: newest, by number, the list, the run by its key, an alias set by hand
    assert registry.show(uri, registry.Ref(name))["version"] == version
    assert registry.show(uri, f"{name}/{version}")["lineage"]["run_key"] == key
    [model] = registry.list_models(uri, name)
    assert [v["version"] for v in model["versions"]] == [version]
    assert registry.mlflow_run_for(uri, key)["run_id"] == run_id
    registry.promote(uri, name, version, "champion", "test: quoting")
    assert registry.show(uri, f"{name}@champion")["version"] == version


def test_a_name_the_form_allows_is_found_alike_on_both_paths(mlflow_server, mlflow_client):
    assert re.match(MODEL_NAME_PATTERN, FORM_NAME)
    _assert_one_version_on_both_paths(mlflow_server, mlflow_client, FORM_NAME)


def test_a_name_with_both_quotes_is_found_alike_on_both_paths_and_never_its_lookalike(mlflow_server, mlflow_client):
    assert not re.match(MODEL_NAME_PATTERN, QUOTED)  # not from the form; the CLI passes it through
    assert " LIKE " in registry.client.equals("name", QUOTED)
    # A lookalike with more and newer versions, and a run with a lookalike key in the quoted name's experiment.
    for i in range(2):
        _add_version(mlflow_client, DECOY, f"loraflow_finetune/{DECOY} run {i}")
    decoy_run = registry.ensure_run(mlflow_server, QUOTED, f"loraflow_finetune/{DECOY} run", {})

    _assert_one_version_on_both_paths(mlflow_server, mlflow_client, QUOTED)
    assert registry.ensure_run(mlflow_server, QUOTED, f"loraflow_finetune/{QUOTED} run", {}) != decoy_run
    assert registry.registered_version(mlflow_server, DECOY, f"loraflow_finetune/{DECOY} run 1") == "2"
