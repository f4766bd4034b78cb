"""Training throughput: loraflow vs plain HF Trainer + PEFT (baseline b) vs TRL SFTTrainer.

Every setup trains the same bench Llama (random weights, built from a config), the same
LoRA config and the same long-tailed prompt/completion data until it has seen the same
number of real (non-pad) tokens. Setups run interleaved, round after round, in this one
process, so machine load hits them alike; the table shows medians over rounds and the
ratio of each setup's tokens/s to baseline (b). Loss columns show the speed is not bought
with wrong training: the train loss near the end of the budget, and the completion loss
on held-out rows computed by one shared function.

    python bench/throughput.py            # the measurement in docs/benchmarks.md
    python bench/throughput.py --smoke    # seconds, for CI
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import runners  # noqa: E402

BASELINE = "hf_padding"
DEFAULT_SETUPS = ["hf_padding", "loraflow", "loraflow_packing", "trl_default", "trl_padding_free", "trl_packing"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model and budget (CI)")
    p.add_argument("--setups", nargs="+", default=DEFAULT_SETUPS, choices=list(runners.SETUPS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tokens", type=int, default=30_000, help="non-pad training tokens per run")
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3, help="constant learning rate")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    a = p.parse_args(argv)
    if a.smoke:
        a.rounds, a.tokens, a.rows, a.hidden, a.layers, a.max_seq_length = 1, 400, 64, 64, 2, 128
    runners.quiet_libraries()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)

    model_dir = common.bench_model(hidden=a.hidden, layers=a.layers, vocab=512 if a.smoke else 2048)
    rows = common.prompt_completion_rows(a.rows + 64, seed=7)
    train_path = common.write_jsonl(common.CACHE / f"throughput-{a.rows}.jsonl", rows[: a.rows])
    w = runners.Workload(
        model_dir=model_dir,
        train_path=train_path,
        eval_rows=rows[a.rows : a.rows + (4 if a.smoke else 64)],
        batch_size=a.batch_size,
        max_seq_length=a.max_seq_length,
        token_budget=a.tokens,
        learning_rate=a.lr,
        mean_tokens=runners.mean_tokens(model_dir, rows[: a.rows], a.max_seq_length),
    )
    info = common.machine()
    info["torch_threads"] = __import__("torch").get_num_threads()
    print(
        f"model {model_dir.name}, {a.rows} rows (mean {w.mean_tokens:.0f} tokens), batch {w.batch_size} examples, "
        f"budget {w.token_budget} tokens, {a.rounds} round(s), load {info['load_average_start']}",
        flush=True,
    )

    runs: list[dict] = []
    for r in range(a.rounds):
        for s in a.setups:
            res = runners.run(s, w)
            res["round"] = r
            res["load_average"] = common.load_average()
            runs.append(res)
            print(
                f"  round {r} {s:<18} {res['tokens_per_s']:8.0f} tok/s wall  "
                f"{res['tokens_per_cpu_s']:8.0f} tok/cpu-s  {res['steps']:3d} steps  "
                f"pad {res['pad_fraction']:.0%}  eval_loss {res['eval_loss']:.3f}  load {res['load_average'][0]}",
                flush=True,
            )

    summary = []
    base_rate = (
        statistics.median(r["tokens_per_s"] for r in runs if r["setup"] == BASELINE) if BASELINE in a.setups else None
    )
    base_cpu = (
        statistics.median(r["tokens_per_cpu_s"] for r in runs if r["setup"] == BASELINE)
        if BASELINE in a.setups
        else None
    )
    for s in a.setups:
        mine = [r for r in runs if r["setup"] == s]
        row = {
            k: statistics.median(r[k] for r in mine)
            for k in (
                "tokens_per_s",
                "time_to_budget_s",
                "tokens_per_cpu_s",
                "cpu_s_to_budget",
                "pad_fraction",
                "steps",
                "setup_s",
                "train_loss_last20pct",
                "eval_loss",
            )
        }
        row["setup"] = s
        row["x_vs_b"] = row["tokens_per_s"] / base_rate if base_rate else None
        row["cpu_x_vs_b"] = row["tokens_per_cpu_s"] / base_cpu if base_cpu else None
        summary.append(row)
    cols = [
        "setup",
        "tokens_per_cpu_s",
        "cpu_x_vs_b",
        "cpu_s_to_budget",
        "tokens_per_s",
        "x_vs_b",
        "time_to_budget_s",
        "steps",
        "pad_fraction",
        "setup_s",
        "train_loss_last20pct",
        "eval_loss",
    ]
    print()
    print(common.table(summary, cols))
    info["load_average_end"] = common.load_average()
    common.write_result(
        "throughput",
        {
            "machine": info,
            "smoke": a.smoke,
            "workload": {k: str(v) if isinstance(v, Path) else v for k, v in w.__dict__.items() if k != "eval_rows"},
            "eval_rows": len(w.eval_rows),
            "baseline": BASELINE,
            "summary": summary,
            "runs": runs,
        },
        a.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
