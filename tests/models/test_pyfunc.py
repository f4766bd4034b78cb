"""MLflow-native loading: ``models:/<name>@champion`` is a working model, no loraflow code needed."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_champion_loads_with_pyfunc_on_its_base_model_and_generates(registered, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["tracking_uri"])
    model = mlflow.pyfunc.load_model(f"models:/{registered['name']}@champion")
    pipeline = model.get_raw_model()  # the transformers pipeline behind the pyfunc
    assert type(pipeline.model).__name__.startswith("Peft")  # the adapter, loaded on the base model
    assert "max_new_tokens" in {p.name for p in model.metadata.get_params_schema().params}

    prompt = "What is the capital of France?"
    [short] = model.predict([prompt], params={"max_new_tokens": 1})
    [longer] = model.predict([prompt], params={"max_new_tokens": 12})
    assert isinstance(longer, str) and longer.strip()
    tokens = lambda text: len(pipeline.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert tokens(longer) > tokens(short)  # the params schema is honoured: max_new_tokens reaches generate()
