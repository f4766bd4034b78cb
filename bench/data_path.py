"""Data path: rows/s and peak memory of loraflow's data checks + preprocessing on 1M rows.

Runs the Airflow side's own functions (``loraflow.data.checks.check`` with the token-length
check through the fast tokenizer, then ``loraflow.data.preprocess.preprocess``) on generated
JSONL datasets, chat and prompt/completion. Each stage runs in a fresh subprocess, as
Airflow runs each task in its own process, so its peak RSS is its own. Memory is compared
with the dataset's size on disk. ``--profile`` adds a cProfile
of each run (top functions by cumulative time) to the JSON and the output.

    python bench/data_path.py                 # 1M rows per format
    python bench/data_path.py --smoke         # 2k rows
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

MARK = "BENCH_DATA_RESULT="
SYSTEM = "You are a concise assistant."


def dataset(fmt: str, rows: int) -> Path:
    """Generated once into the cache: long-tailed lengths, ~1% system prompts varied, no duplicates."""
    path = common.CACHE / f"data-{fmt}-{rows}.jsonl"
    if path.exists():
        return path
    gen = common.TextGen(seed=11)
    users = gen.texts(gen.lengths(rows, median=12, sigma=0.8, hi=400))
    answers = gen.texts(gen.lengths(rows, median=20, sigma=1.0, hi=800))
    tmp = path.with_suffix(".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("w") as f:
        for i, (u, ans) in enumerate(zip(users, answers, strict=True)):
            u = f"{u} #{i}"  # unique rows: the duplicate rule should pass, not drop half the data
            if fmt == "chat":
                msgs = ([{"role": "system", "content": SYSTEM}] if i % 3 == 0 else []) + [
                    {"role": "user", "content": u},
                    {"role": "assistant", "content": ans},
                ]
                f.write(json.dumps({"messages": msgs}) + "\n")
            else:
                f.write(json.dumps({"prompt": u, "completion": " " + ans}) + "\n")
    tmp.replace(path)
    return path


def child(
    stage: str,
    fmt: str,
    path: Path,
    tokenizer_json: Path,
    model_dir: Path,
    max_seq_length: int,
    profile: bool,
    max_gb: float = 0.0,
) -> None:
    """One pipeline task (check or preprocess) in its own process, as Airflow runs each task."""
    sys.path.insert(0, str(common.REPO / "plugins"))
    import pyarrow.parquet  # noqa: F401  (the stages' lazy imports count with the imports, not the data)
    import tokenizers  # noqa: F401

    from loraflow.data import checks
    from loraflow.data.preprocess import preprocess
    from loraflow_trainer import spec

    if max_gb:
        # A shared machine: a run that would need more fails here instead of pushing others into OOM.
        resource.setrlimit(resource.RLIMIT_AS, (int(max_gb * 2**30), int(max_gb * 2**30)))
    rss_imports = common.current_rss_mb()
    job = spec.validate(
        {
            "model": {"base_model": str(model_dir)},
            "data": {"train_path": "data/train.parquet", "eval_path": "data/eval.parquet", "data_format": fmt},
            "training": {"max_seq_length": max_seq_length},
        }
    )
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    res: dict = {"stage": stage, "format": fmt}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as ws:
        t0 = time.perf_counter()
        if stage == "check":
            report = checks.check(
                path,
                fmt,
                max_seq_length=max_seq_length,
                min_rows=10,
                tokenizer_json=tokenizer_json,
                report_path=Path(ws) / "data_report.json",
            )
            res.update(rows=report["rows"], token_lengths=report.get("token_lengths"), passed=report["passed"])
        else:
            result = preprocess(path, job, Path(ws), eval_fraction=0.05)
            res.update(
                rows=result.train_rows + result.eval_rows + result.dropped_duplicates,
                train_rows=result.train_rows,
                eval_rows=result.eval_rows,
                parquet_out_mb=sum(p.stat().st_size for p in (Path(ws) / "data").glob("*.parquet")) / 2**20,
            )
        res["seconds"] = time.perf_counter() - t0
    top = []
    if prof is not None:
        import io
        import pstats

        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
        top = buf.getvalue().splitlines()
    res.update(rss_after_imports_mb=rss_imports, peak_rss_mb=common.peak_rss_mb(), profile=top)
    print(MARK + json.dumps(res), flush=True)


def run_stage(stage: str, fmt: str, a) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        f"{stage}:{fmt}",
        "--rows",
        str(a.rows),
        "--max-seq-length",
        str(a.max_seq_length),
        "--max-gb",
        str(a.max_gb),
    ]
    proc = subprocess.run(
        cmd + (["--smoke"] if a.smoke else []) + (["--profile"] if a.profile else []), text=True, capture_output=True
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)), None)
    if proc.returncode != 0 or line is None:
        print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
        print(f"  data path child {stage}:{fmt} failed with exit {proc.returncode}", flush=True)
        last_err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        return {
            "stage": stage,
            "format": fmt,
            "failed": f"exit {proc.returncode}: {last_err[:300]}",
            "rows": a.rows,
            "seconds": float("nan"),
            "peak_rss_mb": float("nan"),
            "rss_after_imports_mb": float("nan"),
            "profile": [],
            "token_lengths": None,
            "train_rows": None,
            "eval_rows": None,
        }
    return json.loads(line[len(MARK) :])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--formats", nargs="+", default=["prompt_completion", "chat"], choices=["prompt_completion", "chat"])
    p.add_argument("--max-seq-length", type=int, default=2048)
    p.add_argument("--profile", action="store_true", help="cProfile each run (slower; shows where time goes)")
    p.add_argument("--max-gb", type=float, default=0.0, help="address-space cap per stage (0: none)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.smoke:
        a.rows = 2000
    model_dir = common.bench_model(hidden=64, layers=2, vocab=512) if a.smoke else common.bench_model()
    tokenizer_json = model_dir / "tokenizer.json"
    if a.child:
        stage, fmt = a.child.split(":")
        child(stage, fmt, dataset(fmt, a.rows), tokenizer_json, model_dir, a.max_seq_length, a.profile, a.max_gb)
        return 0

    info = common.machine()
    results = []
    for fmt in a.formats:
        t = time.perf_counter()
        path = dataset(fmt, a.rows)
        size_mb = path.stat().st_size / 2**20
        print(
            f"  dataset {path.name}: {size_mb:.0f} MB (generated/cached in {time.perf_counter() - t:.0f}s)", flush=True
        )
        chk, pre = run_stage("check", fmt, a), run_stage("preprocess", fmt, a)
        total = chk["seconds"] + pre["seconds"]
        peak = max(chk["peak_rss_mb"], pre["peak_rss_mb"])
        data_rss = max(
            chk["peak_rss_mb"] - chk["rss_after_imports_mb"], pre["peak_rss_mb"] - pre["rss_after_imports_mb"]
        )
        res = {
            "format": fmt,
            "rows": chk["rows"],
            "dataset_mb": size_mb,
            "check_s": chk["seconds"],
            "preprocess_s": pre["seconds"],
            "total_s": total,
            "rows_per_s": chk["rows"] / total,
            "check_peak_rss_mb": chk["peak_rss_mb"],
            "preprocess_peak_rss_mb": pre["peak_rss_mb"],
            "rss_after_imports_mb": chk["rss_after_imports_mb"],
            "data_rss_mb": data_rss,
            "mem_x_dataset": data_rss / size_mb,
            "peak_x_dataset": peak / size_mb,
            "token_lengths": chk["token_lengths"],
            "train_rows": pre["train_rows"],
            "eval_rows": pre["eval_rows"],
            "failed": {x["stage"]: x["failed"] for x in (chk, pre) if "failed" in x},
            "load_average": common.load_average(),
            "profile": {"check": chk["profile"], "preprocess": pre["profile"]},
        }
        results.append(res)
        print(
            f"  {fmt:<18} {res['rows_per_s']:10,.0f} rows/s  "
            f"check {res['check_s']:.1f}s  preprocess {res['preprocess_s']:.1f}s  "
            f"peak RSS check {chk['peak_rss_mb']:.0f} MB / preprocess {pre['peak_rss_mb']:.0f} MB "
            f"({res['mem_x_dataset']:.1f}x dataset above imports)  load {res['load_average'][0]}",
            flush=True,
        )
        if a.profile:
            print("\n".join(chk["profile"] + pre["profile"]))
    cols = [
        "format",
        "rows",
        "dataset_mb",
        "check_s",
        "preprocess_s",
        "total_s",
        "rows_per_s",
        "check_peak_rss_mb",
        "preprocess_peak_rss_mb",
        "rss_after_imports_mb",
        "data_rss_mb",
        "mem_x_dataset",
    ]
    print()
    print(common.table(results, cols))
    info["load_average_end"] = common.load_average()
    common.write_result(
        "data_path",
        {
            "machine": info,
            "smoke": a.smoke,
            "max_seq_length": a.max_seq_length,
            "goal": {"total_s": 30, "mem_x_dataset": 3},
            "results": results,
        },
        a.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
