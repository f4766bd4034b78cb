"""``loraflow models export``: merged weights plain transformers loads, the adapter alone, a vLLM hand-off; lineage."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from loraflow.cli import main

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "What is 3 plus 4?", "Name a colour.", "hello"]


@pytest.fixture(scope="module")
def exported(train_version) -> dict:
    return {"name": "export-demo", "version": train_version("export-demo", seed=3, steps=8)}


def export(capsys, ref: str, *argv: str) -> tuple[int, dict | None, str]:
    code = main(["models", "export", ref, *argv, "--json"])
    out = capsys.readouterr()
    return code, json.loads(out.out) if code == 0 else None, out.err


def greedy(model, tok, prompt: str) -> list[int]:
    import torch

    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id
        )
    return out[0, enc["input_ids"].shape[1] :].tolist()


def test_merged_export_loads_with_plain_transformers_and_answers_like_base_plus_adapter(
    exported, mlflow_server, tiny_model, capsys, tmp_path
):
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow import registry
    from loraflow_trainer import inference
    from loraflow_trainer.base_model import weights_sha256

    ref = f"{exported['name']}/{exported['version']}"
    out = tmp_path / "merged"
    code, result, err = export(capsys, ref, "--format", "merged", "--out", str(out), "--register")
    assert code == 0, err

    merged = AutoModelForCausalLM.from_pretrained(out)  # no peft: a standard HF model directory
    assert not type(merged).__name__.startswith("Peft") and not any("lora" in n for n, _ in merged.named_parameters())
    tok = AutoTokenizer.from_pretrained(out)
    base_dtype = AutoModelForCausalLM.from_pretrained(tiny_model, dtype="auto").dtype
    assert merged.dtype == base_dtype and result["dtype"] == str(base_dtype).removeprefix("torch.")

    info = registry.show(mlflow_server, ref)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_model, adapter_tok = inference.load(
            registry.download_model(mlflow_server, info, Path(tmp)), str(tiny_model)
        )
    assert type(adapter_model).__name__.startswith("Peft")
    for prompt in PROMPTS:
        assert greedy(merged, tok, prompt) == greedy(adapter_model, adapter_tok, prompt), prompt

    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["source"]["name"] == exported["name"] and lineage["source"]["version"] == exported["version"]
    assert lineage["base"]["reference"]["sha256"] == weights_sha256(tiny_model)
    assert lineage["base"]["resolved"] == str(tiny_model.resolve())
    assert lineage["caveat"] is None  # trained without quantization
    for rel, sha in lineage["files"].items():
        import hashlib

        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == sha, rel

    # --register: its own model version, linked both ways to the adapter version
    mc = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    reg = result["registered"]
    mv = mc.get_model_version(reg["name"], reg["version"])
    assert reg["name"] == f"{exported['name']}-merged"
    assert mv.tags["loraflow.source_version"] == exported["version"] and mv.tags[
        "loraflow.base_sha256"
    ] == weights_sha256(tiny_model)
    assert (
        mc.get_model_version(exported["name"], exported["version"]).tags["loraflow.merged_version"]
        == f"{reg['name']}/{reg['version']}"
    )


def test_peft_and_vllm_exports_hand_the_adapter_to_other_servers(exported, tiny_model, capsys, tmp_path):
    ref = f"{exported['name']}/{exported['version']}"
    code, _, err = export(capsys, ref, "--format", "peft", "--out", str(tmp_path / "peft"))
    assert code == 0, err
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model.resolve()) and cfg["peft_type"] == "LORA"
    assert (tmp_path / "peft" / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((tmp_path / "peft" / "lineage.json").read_text())["format"] == "peft"

    from peft import AutoPeftModelForCausalLM

    assert type(AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft")).__name__.startswith("Peft")

    out = tmp_path / "vllm"
    code, result, err = export(capsys, ref, "--format", "vllm", "--out", str(out))
    assert code == 0, err
    assert f"--lora-modules {exported['name']}={(out / 'adapter').resolve()}" in result["vllm_command"]
    # run.sh as a user runs it, with a stand-in `vllm` on PATH that prints what it was given
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vllm").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (bin_dir / "vllm").chmod(0o755)
    argv = subprocess.run(
        [str(out / "run.sh"), "--port", "9000"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    ).stdout.splitlines()
    assert argv[:3] == ["serve", str(tiny_model.resolve()), "--enable-lora"]
    lora = argv[argv.index("--lora-modules") + 1]
    assert lora == f"{exported['name']}={out.resolve()}/adapter" and (out / "adapter" / "adapter_config.json").exists()
    assert int(argv[argv.index("--max-lora-rank") + 1]) >= cfg["r"] and argv[-2:] == ["--port", "9000"]


def test_export_refuses_a_non_empty_out_dir_and_register_without_merge(exported, capsys, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    ref = f"{exported['name']}/{exported['version']}"
    code, _, err = export(capsys, ref, "--format", "peft", "--out", str(tmp_path))
    assert code == 1 and "is not empty" in err and (tmp_path / "keep.txt").read_text() == "mine"
    code, _, err = export(capsys, ref, "--format", "peft", "--out", str(tmp_path / "new"), "--register")
    assert code == 1 and "--format merged" in err and not (tmp_path / "new").exists()
