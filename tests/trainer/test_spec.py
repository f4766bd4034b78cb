"""The job spec: one clear message per wrong field, and importable without torch."""

import subprocess
import sys

import pytest

from loraflow_trainer import spec
from loraflow_trainer.errors import JobSpecError


def test_invalid_spec_names_every_wrong_field():
    bad = {
        "model": {"base_model": "", "quantization": "3bit"},
        "data": {"train_path": "x.jsonl"},
        "lora": {"lora_r": 0},
        "training": {"learning_rate": -1, "bogus": 1},
    }
    with pytest.raises(JobSpecError) as err:
        spec.validate(bad)
    msg = str(err.value)
    for field in ("model.base_model", "model.quantization", "lora.lora_r", "training.learning_rate", "training.bogus"):
        assert field in msg


def test_packing_is_on_by_default_and_dp_turns_it_off_while_quantization_is_refused():
    base = {"model": {"base_model": "m"}, "data": {"train_path": "t.jsonl"}}
    assert spec.validate(base).training.packing is True
    dp = {**base, "privacy": {"dp_enabled": True}}
    assert spec.validate(dp).training.packing is False
    # One example per row under DP.
    assert spec.validate({**dp, "training": {"packing": True}}).training.packing is False
    flat = {"base_model": "m", "train_path": "t.jsonl", "dp_enabled": True, "packing": True}
    assert spec.from_flat(flat).training.packing is False
    base = dp
    with pytest.raises(JobSpecError, match="quantization"):
        spec.validate({**base, "model": {"base_model": "m", "quantization": "4bit"}})


def test_flat_params_round_trip_through_from_flat():
    job = spec.validate({"model": {"base_model": "m"}, "data": {"train_path": "t.jsonl"}, "lora": {"lora_r": 4}})
    flat = {k: v for k, v in job.flat_params().items() if k != "spec_version"}
    assert spec.from_flat(flat).model_dump() == job.model_dump()
    with pytest.raises(JobSpecError, match="unknown setting"):
        spec.from_flat({**flat, "lora_rank": 3})


def test_spec_hash_ignores_where_outputs_go_but_not_settings():
    a = spec.validate({"model": {"base_model": "m"}, "data": {"train_path": "t"}, "output_dir": "a"})
    b = spec.validate({"model": {"base_model": "m"}, "data": {"train_path": "t"}, "output_dir": "b"})
    c = spec.validate({"model": {"base_model": "m"}, "data": {"train_path": "t"}, "lora": {"lora_r": 8}})
    assert a.spec_hash() == b.spec_hash() != c.spec_hash()


def test_spec_and_errors_import_without_torch():
    code = "import sys, loraflow_trainer.spec, loraflow_trainer.errors; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_dp_with_gradient_checkpointing_is_refused():
    with pytest.raises(JobSpecError, match="gradient_checkpointing"):
        spec.validate(
            {
                "model": {"base_model": "m"},
                "data": {"train_path": "t.jsonl"},
                "privacy": {"dp_enabled": True},
                "training": {"gradient_checkpointing": True},
            }
        )
