"""Trainer fixtures: a learnable toy task and a job builder writing job.json into a temp dir."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from loraflow_trainer import spec


def toy_rows(n: int, seed: int = 0) -> list[dict]:
    """prompt -> completion pairs with a deterministic rule (learnable in a few dozen steps)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 12), rng.randint(1, 12)
        rows.append({"prompt": f"What is {a} plus {b}?", "completion": f" {a} plus {b} is {a + b}."})
    return rows


@pytest.fixture
def make_job(tmp_path, tiny_model):
    """Write train/eval data and job.json; return (job_path, JobSpec)."""

    def _make(rows=None, eval_rows=None, data_format="prompt_completion", **sections) -> tuple[Path, spec.JobSpec]:
        rows = rows if rows is not None else toy_rows(96)
        eval_rows = eval_rows if eval_rows is not None else toy_rows(16, seed=1)
        (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
        body = {
            "model": {"base_model": str(tiny_model), **sections.pop("model", {})},
            "data": {
                "train_path": "train.jsonl",
                "eval_path": "eval.jsonl",
                "data_format": data_format,
                **sections.pop("data", {}),
            },
            "training": {
                "max_steps": 8,
                "learning_rate": 5e-3,
                "per_device_train_batch_size": 8,
                "max_seq_length": 64,
                "save_steps": 4,
                **sections.pop("training", {}),
            },
            "evaluation": {"num_sample_generations": 2, "sample_max_new_tokens": 6, **sections.pop("evaluation", {})},
            **sections,
        }
        job = spec.validate(body)
        job.write(tmp_path / "job.json")
        return tmp_path / "job.json", job

    return _make
