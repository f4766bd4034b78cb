"""GPU throughput, MFU and peak memory: loraflow vs baseline (b) at ~1B and ~8B, seq 2048, bf16.

Llama-architecture models are built from a config with random weights (Llama-3.2-1B and
Llama-3-8B shapes; throughput and memory do not depend on weight values), saved once to
the cache in bf16 so every setup loads them the same way (QLoRA quantizes at load). The
data is long-tailed prompt/completion up to 2048 tokens. Setups run interleaved in this
one process, as in ``throughput.py``.

MFU = tokens/s x 4 N / peak, with N the parameters of the linear layers (including the LM
head, excluding the input embedding, which is a lookup). 4N per token is the forward
(2N) plus the backward through activations (2N); LoRA computes no weight gradients for
the frozen base, and recomputation under gradient checkpointing is not counted as useful
work. The attention score FLOPs are left out (a few % at 2048 tokens). The peak is the
GPU's dense bf16 figure, read from the device name.

Without CUDA it prints that no GPU is present and exits 0.

``--scaling`` measures data-parallel scaling instead: the same job through ``loraflow-train``
(the CLI the container runs, so torchrun, DDP and rank-0 saving are all in the figure) on 1
GPU and on N (``--gpus``, default all visible), the per-device batch held fixed (weak
scaling: N times the effective batch). It reports tokens/s on 1 and N, tokens/s per GPU and
the ratio N/1 (ideal: N). With fewer than 2 GPUs it says so and exits 0.

    python bench/gpu.py                     # 1b and 8b, LoRA and QLoRA 4-bit
    python bench/gpu.py --sizes 8b --quant 4bit --setups loraflow_packing
    python bench/gpu.py --scaling --sizes 1b --gpus 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SIZES = {
    # Llama-3.2-1B and Llama-3-8B shapes.
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}
# Dense bf16 peak TFLOP/s (no sparsity), matched on the device name, most specific first.
PEAK_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 125.0),
    ("L4", 121.0),
]


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS if k in name), None)


def build_model(size: str) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = common.CACHE / f"gpu-llama-{size}"
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(common.bench_model())
    config = LlamaConfig(
        **SIZES[size],
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    torch.cuda.empty_cache()
    tmp.replace(out)
    return out


def linear_params(model_dir: Path) -> int:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, i, layers, kv = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_key_value_heads
    head_dim = h // c.num_attention_heads
    per_layer = h * h * 2 + 2 * h * kv * head_dim + 3 * h * i  # q, o; k, v; gate, up, down
    return layers * per_layer + h * c.vocab_size  # + LM head


def long_rows(n: int) -> list[dict[str, str]]:
    """Prompt/completion rows with long completions (~500 words median): where GPU throughput matters."""
    gen = common.TextGen(seed=5)
    prompts = gen.texts(gen.lengths(n, median=60, sigma=0.8, hi=600))
    completions = gen.texts(gen.lengths(n, median=500, sigma=0.7, hi=1800))
    return [{"prompt": pr + " ?", "completion": " " + c + "."} for pr, c in zip(prompts, completions, strict=True)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["1b", "8b"], choices=list(SIZES))
    p.add_argument("--quant", nargs="+", default=["none", "4bit"], choices=["none", "4bit"])
    p.add_argument("--setups", nargs="+", default=["hf_padding", "loraflow", "loraflow_packing"])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--tokens", type=int, default=120_000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-length", type=int, default=2048)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--smoke", action="store_true", help="on CUDA: the tiny bench model, a few steps")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--scaling", action="store_true", help="tokens/s of loraflow-train on 1 GPU and on --gpus GPUs")
    p.add_argument("--gpus", type=int, default=None, help="GPUs for --scaling (default: all visible)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per --scaling run")
    a = p.parse_args(argv)
    import torch

    info = common.machine()
    if a.scaling:
        return scaling(a, info)
    if not torch.cuda.is_available():
        print("no CUDA GPU present: the GPU benchmark needs one and was skipped (nothing measured)")
        common.write_result(
            "gpu", {"machine": info, "smoke": a.smoke, "skipped": "no CUDA GPU present", "results": []}, a.out
        )
        return 0

    import runners

    runners.quiet_libraries()
    name = torch.cuda.get_device_name(0)
    peak = peak_tflops(name)
    rows = common.prompt_completion_rows(64, seed=9)  # eval rows
    n = 64 if a.smoke else 2000
    train_rows = long_rows(n)
    train_path = common.write_jsonl(common.CACHE / f"gpu-train-{n}.jsonl", train_rows)
    results = []
    sizes = ["smoke"] if a.smoke else a.sizes
    for size in sizes:
        model_dir = common.bench_model() if size == "smoke" else build_model(size)
        n_lin = linear_params(model_dir)
        for quant in a.quant:
            w = runners.Workload(
                model_dir=model_dir,
                train_path=train_path,
                eval_rows=rows[:8],
                batch_size=a.batch_size,
                max_seq_length=a.max_seq_length,
                token_budget=2000 if a.smoke else a.tokens,
                learning_rate=2e-4,
                quantization=quant,
                bf16=torch.cuda.is_bf16_supported(),
                gradient_checkpointing=not a.no_gradient_checkpointing,
                mean_tokens=runners.mean_tokens(model_dir, train_rows, a.max_seq_length),
            )
            runs = []
            for r in range(a.rounds):
                for s in a.setups:
                    try:
                        res = runners.run(s, w)
                    except torch.OutOfMemoryError:
                        res = {"setup": s, "oom": True, "tokens_per_s": 0.0, "peak_cuda_mb": None}
                    res.update(size=size, quantization=quant, round=r, load_average=common.load_average())
                    runs.append(res)
                    torch.cuda.empty_cache()
            for s in a.setups:
                mine = [x for x in runs if x["setup"] == s]
                rate = statistics.median(x["tokens_per_s"] for x in mine)
                mem = max((x["peak_cuda_mb"] or 0) for x in mine)
                row = {
                    "size": size,
                    "quantization": quant,
                    "setup": s,
                    "tokens_per_s": rate,
                    "mfu": rate * 4 * n_lin / (peak * 1e12) if peak else None,
                    "peak_gib": mem / 1024,
                    "eval_loss": statistics.median(x.get("eval_loss", float("nan")) for x in mine),
                    "pad_fraction": statistics.median(x.get("pad_fraction", 0.0) for x in mine),
                    "oom": any(x.get("oom") for x in mine),
                    "linear_params": n_lin,
                }
                results.append(row)
            base = next(
                (
                    x["tokens_per_s"]
                    for x in results
                    if x["size"] == size and x["quantization"] == quant and x["setup"] == "hf_padding"
                ),
                None,
            )
            for x in results:
                if x["size"] == size and x["quantization"] == quant:
                    x["x_vs_b"] = x["tokens_per_s"] / base if base else None
            print(
                common.table(
                    [x for x in results if x["size"] == size and x["quantization"] == quant],
                    [
                        "size",
                        "quantization",
                        "setup",
                        "tokens_per_s",
                        "x_vs_b",
                        "mfu",
                        "peak_gib",
                        "pad_fraction",
                        "eval_loss",
                        "oom",
                    ],
                ),
                flush=True,
            )
    print(f"\nGPU {name}, dense bf16 peak {peak} TFLOP/s; MFU = tokens/s * 4 * N_linear / peak")
    print(common.table(results, ["size", "quantization", "setup", "tokens_per_s", "x_vs_b", "mfu", "peak_gib", "oom"]))
    common.write_result(
        "gpu",
        {
            "machine": info,
            "smoke": a.smoke,
            "gpu": name,
            "peak_tflops": peak,
            "mfu_formula": "tokens_per_s * 4 * N_linear / peak_dense_bf16",
            "results": results,
        },
        a.out,
    )
    return 0


def scaling(a, info: dict) -> int:
    """loraflow-train on 1 GPU and on N: tokens/s, tokens/s per GPU, and the ratio."""
    import json
    import os
    import subprocess

    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    n = a.gpus or visible
    if visible < 2 or n < 2 or n > visible:
        msg = f"scaling needs 2 or more GPUs (visible: {visible}, asked: {a.gpus}): nothing measured"
        print(msg)
        common.write_result("gpu_scaling", {"machine": info, "skipped": msg, "results": []}, a.out)
        return 0
    rows = long_rows(4000)
    results = []
    for size in a.sizes:
        model_dir = common.bench_model() if a.smoke else build_model(size)
        for quant in a.quant:
            for procs in (1, n):
                job_dir = common.CACHE / f"scaling-{size}-{quant}-{procs}"
                subprocess.run(["rm", "-rf", str(job_dir)], check=True)
                job_dir.mkdir(parents=True)
                common.write_jsonl(job_dir / "train.jsonl", rows)
                job = {
                    "model": {"base_model": str(model_dir), "quantization": quant},
                    "data": {"train_path": "train.jsonl", "data_format": "prompt_completion"},
                    "training": {
                        "max_steps": 5 if a.smoke else a.steps,
                        "per_device_train_batch_size": a.batch_size,
                        "max_seq_length": a.max_seq_length,
                        "save_steps": 10_000,
                        "num_processes": procs,
                        "gradient_checkpointing": not a.no_gradient_checkpointing,
                    },
                    "evaluation": {"num_sample_generations": 0},
                }
                (job_dir / "job.json").write_text(json.dumps(job))
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(procs)))}
                proc = subprocess.run(
                    [sys.executable, "-m", "loraflow_trainer", "--job", str(job_dir / "job.json")],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    results.append({"size": size, "quantization": quant, "gpus": procs, "failed": proc.returncode})
                    continue
                m = json.loads((job_dir / "output" / "metrics.json").read_text())
                results.append(
                    {
                        "size": size,
                        "quantization": quant,
                        "gpus": procs,
                        "tokens_per_s": m["tokens_per_second"],
                        "tokens_per_s_per_gpu": m["tokens_per_second_per_device"],
                        "effective_batch": m["effective_batch_size"],
                        "peak_gib": m["peak_memory_mb"] / 1024,
                    }
                )
            one = next(
                (
                    x
                    for x in results
                    if (x["size"], x["quantization"], x["gpus"]) == (size, quant, 1) and "tokens_per_s" in x
                ),
                None,
            )
            for x in results:
                if (x["size"], x["quantization"]) == (size, quant) and one and "tokens_per_s" in x:
                    x["ratio_vs_1"] = x["tokens_per_s"] / one["tokens_per_s"]
                    x["efficiency"] = x["ratio_vs_1"] / x["gpus"]
    name = torch.cuda.get_device_name(0)
    print(
        f"\nloraflow-train data-parallel scaling on {n} x {name} "
        f"(per-device batch {a.batch_size}, seq {a.max_seq_length})"
    )
    print(
        common.table(
            results,
            [
                "size",
                "quantization",
                "gpus",
                "tokens_per_s",
                "tokens_per_s_per_gpu",
                "ratio_vs_1",
                "efficiency",
                "effective_batch",
                "peak_gib",
            ],
        )
    )
    common.write_result("gpu_scaling", {"machine": info, "gpu": name, "gpus": n, "results": results}, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
