"""Every benchmark script runs end to end at tiny sizes and writes the JSON the docs are built from.

No timing assertions: the numbers only have to exist and be positive.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_bench(script: str, out: Path, *args: str, timeout: int = 300, table: bool = True) -> dict:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--smoke", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("|" in proc.stdout) == table  # printed its table (or, skipped, none)
    return json.loads((out / f"{Path(script).stem}.json").read_text())


def test_throughput_bench_measures_every_setup_against_the_baseline(tmp_path):
    res = run_bench("throughput.py", tmp_path)
    setups = {row["setup"]: row for row in res["summary"]}
    assert set(setups) == {
        "hf_padding",
        "loraflow",
        "loraflow_packing",
        "trl_default",
        "trl_padding_free",
        "trl_packing",
    }
    for row in setups.values():
        assert row["tokens_per_s"] > 0 and row["time_to_budget_s"] > 0 and row["x_vs_b"] > 0
        assert row["eval_loss"] > 0
    assert setups["hf_padding"]["x_vs_b"] == pytest.approx(1.0)
    # Padding-free setups feed the model no pad tokens; the padded baseline does.
    assert setups["loraflow_packing"]["pad_fraction"] == 0.0
    assert setups["hf_padding"]["pad_fraction"] > 0.0
    assert res["machine"]["cores"] >= 1 and res["machine"]["load_average_start"]


def test_memory_bench_reports_peak_memory_per_config_in_fresh_processes(tmp_path):
    res = run_bench("memory.py", tmp_path)
    assert [(r["setup"], r["quantization"]) for r in res["results"]] == [
        ("hf_padding", "none"),
        ("loraflow_packing", "none"),
    ]
    for r in res["results"]:
        assert r["peak_rss_mb"] > r["rss_after_imports_mb"] > 0
        assert r["steps"] == 2 and r["tokens"] > 0


def test_data_path_bench_checks_and_preprocesses_both_formats(tmp_path):
    res = run_bench("data_path.py", tmp_path)
    assert {r["format"] for r in res["results"]} == {"prompt_completion", "chat"}
    for r in res["results"]:
        assert r["rows"] == 2000 and r["rows_per_s"] > 0
        assert r["check_peak_rss_mb"] > 0 and r["preprocess_peak_rss_mb"] > 0
        assert r["train_rows"] + r["eval_rows"] == 2000  # generated rows are unique: nothing dropped
        assert r["token_lengths"]["max"] > 0  # the fast-tokenizer length check ran


def test_gpu_bench_exits_cleanly_and_says_so_without_a_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        res = run_bench("gpu.py", tmp_path)
        assert all(r["tokens_per_s"] > 0 for r in res["results"])
    else:
        res = run_bench("gpu.py", tmp_path, table=False)
        assert "no CUDA GPU present" in (tmp_path / "gpu.json").read_text()
        assert res["skipped"] == "no CUDA GPU present" and res["results"] == []


@pytest.mark.slow
def test_pipeline_overhead_bench_runs_a_whole_dag_and_subtracts_training(tmp_path):
    res = run_bench("pipeline_overhead.py", tmp_path, timeout=900)
    (local,) = res["results"]
    assert local["runtime"] == "local" and local["state"] == "success"
    assert local["wall_s"] > local["train_runtime_s"] > 0
    assert {"prepare", "check_data", "preprocess", "train", "register", "teardown"} <= set(local["tasks_s"])
