"""What the evaluate task costs: time per 1k eval examples on the tiny model, next to the train task.

One job (prompt/completion toy sums, the tiny Llama): ``loraflow-train`` trains it, then
``python -m loraflow_trainer.evaluate`` scores the new adapter and a "champion" (a copy of
the adapter) on N eval examples, both as the pipeline runs them (fresh processes). Loss
scoring is per example and per model; generation is greedy on up to 64 eval prompts per
model (the task's cap), so its cost does not grow with N.

    python bench/evaluate_cost.py [--eval-examples 1000] [--smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import CACHE, RESULTS  # noqa: E402


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"prompt": f"What is {a} plus {b}?", "completion": f" {a} plus {b} is {a + b}."}
        for a, b in ((rng.randint(1, 99), rng.randint(1, 99)) for _ in range(n))
    ]


def tiny_model() -> Path:
    out = CACHE / "tiny-llama-eval"
    if not (out / "config.json").exists():
        subprocess.run(
            [
                str(Path(sys.executable).parent / "loraflow-train"),
                "make-tiny-model",
                "--out",
                str(out),
                "--data",
                str(REPO / "examples" / "data" / "sample_prompt_completion.jsonl"),
            ],
            check=True,
        )
    return out


CPU_S: list[float] = []  # CPU seconds of each timed child (less sensitive to a loaded machine than wall time)


def timed(cmd: list[str]) -> float:
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_S.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval-examples", type=int, default=1000)
    p.add_argument("--train-steps", type=int, default=12)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    n_eval = 64 if args.smoke else args.eval_examples
    steps = 2 if args.smoke else args.train_steps
    work = CACHE / "evaluate-cost"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(256, 0)))
    (work / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n_eval, 1)))
    job = {
        "model": {"base_model": str(tiny_model())},
        "data": {"train_path": "train.jsonl", "eval_path": "eval.jsonl", "data_format": "prompt_completion"},
        "training": {
            "max_steps": steps,
            "learning_rate": 1e-2,
            "per_device_train_batch_size": 8,
            "max_seq_length": 128,
        },
        "evaluation": {"num_sample_generations": 1, "per_device_eval_batch_size": 8},
    }
    (work / "job.json").write_text(json.dumps(job))
    py = sys.executable
    train_s = timed([py, "-m", "loraflow_trainer", "--job", str(work / "job.json")])
    shutil.copytree(work / "output" / "adapter", work / "champion")
    (work / "evaluate_request.json").write_text(
        json.dumps(
            {
                "adapters": {"challenger": "output/adapter", "champion": "champion"},
                "champion": {"status": "compared", "version": "bench"},
                "max_generation_examples": 64,
            }
        )
    )
    eval_s = timed([py, "-m", "loraflow_trainer.evaluate", "--job", str(work / "job.json")])
    ev = json.loads((work / "output" / "eval.json").read_text())
    metrics = json.loads((work / "output" / "metrics.json").read_text())
    per_model = {
        k: {
            "loss_s_per_1k": m["loss_seconds"] / ev["n_examples"] * 1000,
            "generation_s": m["seconds"] - m["loss_seconds"],
        }
        for k, m in ev["models"].items()
    }
    result = {
        "eval_examples": ev["n_examples"],
        "generation_examples": ev["n_generation_examples"],
        "train_steps": steps,
        "train_task_wall_s": train_s,
        "train_runtime_s": metrics["train_runtime_s"],
        "evaluate_task_wall_s": eval_s,
        "evaluate_runtime_s": ev["runtime_s"],
        "model_load_s": ev["load_seconds"],
        "per_model": per_model,
        "evaluate_vs_train_wall": eval_s / train_s,
        "evaluate_wall_s_per_1k_examples": eval_s / ev["n_examples"] * 1000,
        "train_task_cpu_s": CPU_S[0],
        "evaluate_task_cpu_s": CPU_S[1],
        "evaluate_vs_train_cpu": CPU_S[1] / CPU_S[0],
        "load_average": os.getloadavg()[0],
        "smoke": args.smoke,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evaluate_cost.json").write_text(json.dumps(result, indent=2))
    print(
        f"eval examples {ev['n_examples']}, 2 adapters, {ev['n_generation_examples']} generations each "
        f"(load average {result['load_average']:.1f})"
    )
    print(f"{'':28}{'seconds':>10}")
    print(f"{'train task (' + str(steps) + ' steps)':28}{train_s:10.1f}")
    print(f"{'evaluate task':28}{eval_s:10.1f}   ({result['evaluate_vs_train_wall']:.2f}x train)")
    print(f"{'CPU s: train / evaluate':28}{CPU_S[0]:10.1f} / {CPU_S[1]:.1f}   ({result['evaluate_vs_train_cpu']:.2f}x)")
    print(f"{'  model load':28}{ev['load_seconds']:10.1f}")
    for k, m in per_model.items():
        print(f"{'  ' + k + ' loss per 1k ex':28}{m['loss_s_per_1k']:10.2f}")
        print(f"{'  ' + k + ' generation':28}{m['generation_s']:10.2f}")


if __name__ == "__main__":
    main()
