"""``HuggingFaceBackend``: the NeMo Safe Synthesizer-shaped face of the training recipe.

For callers that hold a backend object (the tests, a notebook): ``train`` runs
``recipe.run`` and returns the metrics, ``teardown`` frees what it built (idempotent),
``prepare_config`` and ``load_model`` run the model stage alone. What the run built is
readable afterwards (``model``, ``tokenizer``, ``trainer``, ``log_cb``). The steps
themselves live in the stage modules the recipe calls (see ``recipe``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraflow_trainer import launch, model, recipe
from loraflow_trainer.spec import JobSpec


class HuggingFaceBackend:
    """LoRA/QLoRA/DP-SGD on ``AutoModelForCausalLM`` with the HF Trainer, for one job."""

    def __init__(self, job: JobSpec, job_dir: Path):
        self.job = job
        self.job_dir = Path(job_dir).resolve()
        self.output_dir = recipe.output_dir(job, self.job_dir)
        self.built = recipe.Built()

    @property
    def model(self):
        return self.built.model

    @property
    def tokenizer(self):
        return self.built.tokenizer

    @property
    def trainer(self):
        return self.built.trainer

    @property
    def log_cb(self):
        return self.built.log

    def prepare_config(self, add_max_memory: bool = True, **kwargs: Any) -> dict[str, Any]:
        """Arguments for ``from_pretrained`` (``model.from_pretrained_kwargs``), with ``kwargs`` on top."""
        place = launch.placement(self.job)
        prepared = model.from_pretrained_kwargs(self.job, self.job_dir, place, add_max_memory)
        self.built.model_kwargs = {**prepared, **kwargs}
        return self.built.model_kwargs

    def load_model(self, **model_args: Any) -> None:
        """Load the base model and tokenizer (``model.load``) with the prepared arguments."""
        kwargs = {**(self.built.model_kwargs or self.prepare_config()), **model_args}
        self.built.model, self.built.tokenizer = model.load(self.job, self.job_dir, kwargs, launch.placement(self.job))

    def train(self) -> dict[str, Any]:
        """The whole run (``recipe.run``): load, wrap, tokenize, sample, train (resuming), evaluate, save."""
        return recipe.run(self.job, self.job_dir, self.built)

    def teardown(self) -> None:
        """Free the trainer, the model and accelerator memory. Safe to call more than once."""
        recipe.teardown(self.built)
