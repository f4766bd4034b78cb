"""The model stage: the base model and tokenizer loaded as the job says, wrapped with LoRA.

``from_pretrained_kwargs`` turns the job's model section into ``from_pretrained``
arguments (dtype, RoPE scaling, bitsandbytes quantization, device map, memory cap);
``load`` loads the base and its tokenizer with them; ``apply_lora`` prepares k-bit or
checkpointed models for training and wraps the model in a PEFT LoRA adapter built from the
job's lora section (``lora_config``). ``unshard`` gives rank 0 of an FSDP run a whole model
back. Each takes what it needs and returns what it built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.trainer_utils import set_seed

from loraflow_trainer import contract
from loraflow_trainer.errors import ModelNotFoundError
from loraflow_trainer.launch import Placement
from loraflow_trainer.spec import JobSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_model_dir(job: JobSpec, job_dir: Path) -> Path | None:
    """The base model as a local directory, or None for a hub id."""
    if not job.is_local_model(job_dir):
        return None
    return job.resolve(job.model.base_model, job_dir)


def source(job: JobSpec, job_dir: Path) -> str:
    """What ``from_pretrained`` loads: the local directory, or the hub id."""
    return str(base_model_dir(job, job_dir) or job.model.base_model)


def torch_dtype(job: JobSpec, device: str) -> torch.dtype:
    """The weights' dtype: the job's, or for ``auto`` bfloat16 on a GPU that has it, else float32."""
    want = job.model.torch_dtype
    if want == "auto":
        return torch.bfloat16 if (device == "cuda" and torch.cuda.is_bf16_supported()) else torch.float32
    return DTYPES[want]


def quantization_config(job: JobSpec, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """bitsandbytes settings: NF4 with double quantization computing in ``dtype`` (QLoRA), or LLM.int8."""
    if job.model.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if job.model.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def from_pretrained_kwargs(
    job: JobSpec, job_dir: Path, place: Placement, add_max_memory: bool = True
) -> dict[str, Any]:
    """Arguments for ``from_pretrained``: config (RoPE scaling applied), dtype, quantization, memory cap.

    Raises ModelNotFoundError for a local directory that is not a saved model, or a base
    the hub (or its cache) does not have.
    """
    m = job.model
    local = base_model_dir(job, job_dir)
    if local is not None and not contract.is_model_dir(local):
        raise ModelNotFoundError(contract.missing_model_message(local))
    try:
        config = AutoConfig.from_pretrained(
            source(job, job_dir), revision=m.model_revision, trust_remote_code=m.trust_remote_code
        )
    except OSError as exc:
        raise ModelNotFoundError(
            f"base model {m.base_model!r} could not be loaded ({str(exc).splitlines()[0][:160]}); "
            "check the name, or pre-download it into the model cache when the hub is offline"
        ) from None
    if m.rope_scaling_factor:
        rope = dict(getattr(config, "rope_parameters", None) or {})
        rope.update({"rope_type": "linear", "factor": float(m.rope_scaling_factor)})
        config.rope_parameters = rope
    dtype = torch_dtype(job, place.device)
    kwargs: dict[str, Any] = {
        "config": config,
        "revision": m.model_revision,
        "trust_remote_code": m.trust_remote_code,
        "dtype": dtype,
    }
    quantization = quantization_config(job, dtype)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": place.local_rank if place.device == "cuda" else "cpu"}
    if add_max_memory and place.device == "cuda":
        free, _total = torch.cuda.mem_get_info(place.local_rank)
        kwargs["max_memory"] = {place.local_rank: int(free * 0.9)}
    return kwargs


def load(job: JobSpec, job_dir: Path, kwargs: dict[str, Any], place: Placement):
    """(model, tokenizer) of the base, the model on this process's device, its KV cache off for training."""
    where = source(job, job_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, revision=job.model.model_revision)
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except OSError as exc:
        raise ModelNotFoundError(
            f"base model {job.model.base_model!r} could not be loaded ({str(exc).splitlines()[0][:160]})"
        ) from None
    if tokenizer.pad_token_id is None:
        # Llama-style tokenizers ship without a pad token; eos is the usual stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    if job.model.quantization == "none" and place.strategy != "fsdp":  # FSDP places the shards itself
        model.to(place.torch_device)
    model.config.use_cache = False
    return model, tokenizer


def lora_config(job: JobSpec):
    """The PEFT LoRA config of the job's lora section."""
    from peft import LoraConfig

    lora = job.lora
    return LoraConfig(
        r=lora.lora_r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.lora_target_modules,
        use_rslora=lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_lora(model, job: JobSpec):
    """The base wrapped in a fresh LoRA adapter (a PeftModel); k-bit bases are first prepared for training."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    checkpointing = job.training.gradient_checkpointing
    if job.model.quantization != "none":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    # LoRA's A matrices come from torch's RNG, which is seeded per process at random: seed it,
    # so one seed gives one initial adapter (and 1 or N processes start from the same one).
    set_seed(job.training.seed)
    return get_peft_model(model, lora_config(job))


def unshard(trainer, model, job: JobSpec, job_dir: Path, kwargs: dict[str, Any], place: Placement):
    """FSDP: gather the trained weights from every rank (a collective, so every rank calls it),
    and return rank 0 an unsharded copy to sample from and save (a sharded model cannot run on
    one rank alone). Other ranks get ``model`` back."""
    state = trainer.accelerator.get_state_dict(trainer.model)  # full tensors, on rank 0
    if not place.is_main:
        return model
    from peft import get_peft_model

    load_kwargs = {k: v for k, v in kwargs.items() if k not in ("device_map", "max_memory")}
    base = AutoModelForCausalLM.from_pretrained(source(job, job_dir), **load_kwargs)
    base.config.use_cache = False
    fresh = get_peft_model(base, model.peft_config["default"])
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    lora_missing = [k for k in missing if "lora_" in k]
    if lora_missing or unexpected:
        raise RuntimeError(
            f"FSDP state dict does not fit the LoRA model (missing {lora_missing[:3]}, unexpected {unexpected[:3]})"
        )
    return fresh.to(place.torch_device)
