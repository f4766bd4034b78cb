"""Real training of the tiny model on CPU: every feature, judged by its outputs."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraflow_trainer.backend import HuggingFaceBackend
from loraflow_trainer.base_model import file_sha256


def _train(job_path, job, inspect=None):
    backend = HuggingFaceBackend(job, job_path.parent)
    try:
        metrics = backend.train()
        if inspect is not None:
            inspect(backend)
    finally:
        backend.teardown()
    return metrics, job_path.parent / "output"


def test_loss_goes_down_on_a_learnable_task_and_outputs_are_complete(make_job):
    job_path, job = make_job(training={"max_steps": 40, "learning_rate": 1e-2, "save_steps": 100})
    metrics, out = _train(job_path, job)
    assert metrics["final_train_loss"] < 0.6 * metrics["first_train_loss"]
    assert metrics["eval_loss"] < metrics["first_train_loss"]
    assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-4)
    assert metrics["train_tokens"] > 0 and metrics["tokens_per_second"] > 0 and metrics["peak_memory_mb"] > 0
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/tokenizer.json",
        "model/MLmodel",
        "metrics.json",
        "metadata.json",
        "samples.jsonl",
        "_SUCCESS",
    ):
        assert (out / name).exists(), name
    # What registration reads: the run's metrics, and a checksum of every file of adapter/ and model/ that verifies.
    assert json.loads((out / "metrics.json").read_text()) == metrics
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["spec_hash"] == job.spec_hash()
    written = {str(p.relative_to(out)) for sub in ("adapter", "model") for p in (out / sub).rglob("*") if p.is_file()}
    assert "adapter/adapter_model.safetensors" in written and set(meta["checksums"]) == written
    assert all(meta["checksums"][rel] == file_sha256(out / rel) for rel in written)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all({"prompt", "before", "after"} <= s.keys() for s in samples)
    assert not list(out.glob(".staging-*"))


@pytest.mark.parametrize("bits, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_qlora_trains_with_bitsandbytes(make_job, bits, layer):
    job_path, job = make_job(model={"quantization": bits}, training={"max_steps": 3})
    seen = {}

    def inspect(backend):
        base_layers = {type(m.base_layer).__name__ for m in backend.model.modules() if hasattr(m, "base_layer")}
        seen["layers"] = base_layers

    metrics, out = _train(job_path, job, inspect)
    # The frozen base really is quantized under the LoRA adapters, not silently full precision.
    assert seen["layers"] == {layer}
    assert metrics["global_step"] == 3 and (out / "_SUCCESS").exists()
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == job.lora.lora_r


def test_dp_sgd_reports_epsilon_within_target_and_changes_lora_weights(make_job):
    job_path, job = make_job(privacy={"dp_enabled": True, "dp_target_epsilon": 4.0}, training={"max_steps": 4})
    metrics, _ = _train(job_path, job)
    assert 0 < metrics["epsilon"] <= 4.0 + 1e-6
    assert metrics["delta"] > 0 and metrics["dp_noise_multiplier"] > 0
    assert metrics["dp_changed_lora_tensors"] > 0


def test_dp_resume_keeps_the_privacy_already_spent(make_job):
    job_path, job = make_job(
        privacy={"dp_enabled": True, "dp_target_epsilon": 8.0}, training={"max_steps": 6, "save_steps": 2}
    )
    first, out = _train(job_path, job)
    # A kill after step 4: the retry finds checkpoint-4 as the last one and resumes from it.
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")
    assert (out / "checkpoints" / "checkpoint-4" / "dp_accountant.json").exists()
    resumed, _ = _train(job_path, job)
    assert resumed["dp_steps"] == 6
    # Steps 1-4 are still on the bill: forgetting them would report the epsilon of 2 steps.
    assert resumed["epsilon"] == pytest.approx(first["epsilon"], rel=1e-9)
    assert resumed["epsilon"] <= 8.0 + 1e-6


def test_packed_training_learns_and_reports_tokens(make_job):
    job_path, job = make_job(training={"packing": True, "max_steps": 20, "learning_rate": 1e-2, "save_steps": 100})
    metrics, out = _train(job_path, job)
    assert metrics["final_train_loss"] < metrics["first_train_loss"]
    assert metrics["train_tokens"] > 0 and (out / "_SUCCESS").exists()


def test_rope_scaling_reaches_the_model_config(make_job):
    job_path, job = make_job(model={"rope_scaling_factor": 4.0}, training={"max_steps": 1})
    backend = HuggingFaceBackend(job, job_path.parent)
    try:
        backend.prepare_config()
        backend.load_model()
        rope = backend.model.config.rope_parameters
        assert rope["rope_type"] == "linear" and rope["factor"] == 4.0
    finally:
        backend.teardown()


def test_retry_resumes_from_the_last_checkpoint(make_job):
    job_path, job = make_job(training={"max_steps": 4, "save_steps": 2})
    _train(job_path, job)
    out = job_path.parent / "output"
    assert (out / "checkpoints" / "checkpoint-4").exists()
    # A retry with a longer budget continues at step 4, it does not start over.
    # A kill while writing checkpoint-5 left it without trainer_state.json: it must be skipped.
    (out / "checkpoints" / "checkpoint-5").mkdir()
    (out / "checkpoints" / "checkpoint-5" / "adapter_config.json").write_text("{")
    longer = job.model_copy(update={"training": job.training.model_copy(update={"max_steps": 6})})
    longer.write(job_path)
    backend = HuggingFaceBackend(longer, job_path.parent)
    try:
        metrics = backend.train()
        assert metrics["global_step"] == 6
        assert backend.log_cb.losses and len(backend.log_cb.losses) == 2  # steps 5 and 6 only
    finally:
        backend.teardown()


def test_saved_mlflow_model_loads_and_generates(make_job):
    import mlflow

    job_path, job = make_job(training={"max_steps": 2})
    _, out = _train(job_path, job)
    mlmodel = (out / "model" / "MLmodel").read_text()
    assert "local_base_model_path" in mlmodel and not list((out / "model").rglob("model.safetensors"))
    model = mlflow.pyfunc.load_model(str(out / "model"))
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(job.model.base_model)
    base = AutoModelForCausalLM.from_pretrained(job.model.base_model)
    reference = PeftModel.from_pretrained(base, out / "adapter").eval()
    prompt = "What is 2 plus 3?"
    for n in (2, 9):
        [result] = model.predict([prompt], params={"max_new_tokens": n})
        # The served model is base + adapter, answers with the completion only, and honours max_new_tokens.
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = reference.generate(**enc, max_new_tokens=n, do_sample=False)
        assert result == tokenizer.decode(ids[0, enc.input_ids.shape[1] :], skip_special_tokens=True)


def test_teardown_twice_is_safe(make_job):
    job_path, job = make_job(training={"max_steps": 1})
    backend = HuggingFaceBackend(job, job_path.parent)
    backend.train()
    backend.teardown()
    backend.teardown()
    assert backend.model is None and backend.trainer is None
