"""Peak training memory: loraflow vs plain HF Trainer + PEFT (baseline b), LoRA and QLoRA 4-bit.

Each configuration trains in a fresh subprocess (peak RSS is per process and never goes
down), on the same data, batch size, max length, seed and number of steps. On CPU the
figure is the process's max RSS (``ru_maxrss``), with the RSS after imports shown so the
training part can be read off; on CUDA it is ``torch.cuda.max_memory_allocated``.

    python bench/memory.py
    python bench/memory.py --smoke
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

CONFIGS = [
    ("hf_padding", "none"),
    ("loraflow", "none"),
    ("loraflow_packing", "none"),
    ("hf_padding", "4bit"),
    ("loraflow", "4bit"),
    ("loraflow_packing", "4bit"),
]
MARK = "BENCH_MEMORY_RESULT="


def child(setup: str, quant: str, a) -> None:
    import runners

    runners.quiet_libraries()
    import peft  # noqa: F401
    import torch  # noqa: F401  (imported before the baseline reading: every setup needs it)
    import transformers  # noqa: F401

    rss_imports = common.current_rss_mb()
    model_dir = common.bench_model(hidden=a.hidden, layers=a.layers, vocab=512 if a.smoke else 2048)
    rows = common.prompt_completion_rows(a.rows, seed=7)
    train_path = common.write_jsonl(common.CACHE / f"memory-{a.rows}.jsonl", rows)
    w = runners.Workload(
        model_dir=model_dir,
        train_path=train_path,
        eval_rows=[],
        batch_size=a.batch_size,
        max_seq_length=a.max_seq_length,
        token_budget=10**12,
        quantization=quant,
        max_steps=a.steps,
        mean_tokens=1.0,
    )
    res = runners.run(setup, w, evaluate=False)
    res.update(quantization=quant, rss_after_imports_mb=rss_imports, peak_rss_mb=common.peak_rss_mb())
    res["train_rss_mb"] = res["peak_rss_mb"] - rss_imports
    print(MARK + json.dumps(res), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-seq-length", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--configs", nargs="+", default=None, help="setup:quant pairs, e.g. loraflow:4bit")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.smoke:
        a.steps, a.rows, a.batch_size, a.max_seq_length, a.hidden, a.layers = 2, 32, 4, 128, 64, 2
    if a.child:
        setup, quant = a.child.split(":")
        child(setup, quant, a)
        return 0

    configs = [tuple(c.split(":")) for c in a.configs] if a.configs else CONFIGS
    if a.smoke and not a.configs:
        configs = [("hf_padding", "none"), ("loraflow_packing", "none")]
    # Build the shared model once here, not racing in the children.
    common.bench_model(hidden=a.hidden, layers=a.layers, vocab=512 if a.smoke else 2048)
    info = common.machine()
    passthrough = [
        "--steps",
        str(a.steps),
        "--rows",
        str(a.rows),
        "--batch-size",
        str(a.batch_size),
        "--max-seq-length",
        str(a.max_seq_length),
        "--hidden",
        str(a.hidden),
        "--layers",
        str(a.layers),
    ]
    results = []
    for setup, quant in configs:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", f"{setup}:{quant}", *passthrough] + (["--smoke"] if a.smoke else []),
            text=True,
            capture_output=True,
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"memory child {setup}:{quant} failed with exit {proc.returncode}")
        res = json.loads(line[len(MARK) :])
        res["load_average"] = common.load_average()
        results.append(res)
        print(
            f"  {setup:<18} {quant:<5} peak RSS {res['peak_rss_mb']:8.0f} MB  "
            f"(training part {res['train_rss_mb']:6.0f} MB)",
            flush=True,
        )

    base = {r["quantization"]: r for r in results if r["setup"] == "hf_padding"}
    key = "peak_cuda_mb" if results and results[0].get("peak_cuda_mb") else "train_rss_mb"
    for r in results:
        b = base.get(r["quantization"])
        r["x_vs_b"] = r[key] / b[key] if b and b.get(key) else None
    cols = [
        "setup",
        "quantization",
        "peak_rss_mb",
        "rss_after_imports_mb",
        "train_rss_mb",
        "peak_cuda_mb",
        "x_vs_b",
        "padded_tokens",
        "tokens",
        "steps",
    ]
    print()
    print(common.table(results, cols))
    print(f"(x_vs_b compares {key})")
    info["load_average_end"] = common.load_average()
    common.write_result(
        "memory",
        {
            "machine": info,
            "smoke": a.smoke,
            "compared": key,
            "workload": {
                "steps": a.steps,
                "rows": a.rows,
                "batch_size": a.batch_size,
                "max_seq_length": a.max_seq_length,
                "hidden": a.hidden,
                "layers": a.layers,
            },
            "results": results,
        },
        a.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
