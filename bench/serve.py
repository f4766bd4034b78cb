"""Serving latency and throughput: ``loraflow models serve`` vs ``mlflow models serve``, same version, side by side.

Starts a scratch stack (MLflow server, the tiny model, one version trained for a few
steps with ``loraflow-train`` and registered), then both servers on loopback ports for
``models:/NAME@champion`` at once, and sends each the same bounded set of greedy requests
(the same prompts, ``max_new_tokens`` new tokens), first one at a time, then from
``--concurrency`` clients. The two servers are measured in alternating rounds so a
change in machine load hits both. Records requests/s and p50/p95 latency per server and
whether both returned the same completions; everything it starts is stopped at the end.

    python bench/serve.py                      # 40 requests per server and mode
    python bench/serve.py --requests 10 --smoke

Loopback only, no downloads. Writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

sys.path.insert(0, str(common.REPO / "plugins"))
sys.path.insert(0, str(common.REPO / "devtools"))
from loraflow_devstack import wait_http  # noqa: E402

SAMPLE = common.REPO / "examples" / "data" / "sample_chat.jsonl"
NAME = "bench-serve"
PROMPTS = [
    "What is 3 plus 4?",
    "What is the capital of France?",
    "Name a colour.",
    "Say hello.",
    "What is 7 plus 5?",
    "Who wrote Hamlet?",
    "What day comes after Monday?",
    "What is 2 plus 2?",
]


def post(url: str, body: dict, timeout: float = 300) -> tuple[float, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        out = json.load(resp)
    return time.perf_counter() - started, out


class Target:
    def __init__(self, label: str, url: str, body, text):
        self.label, self.url, self.body, self.text = label, url, body, text

    def one(self, prompt: str, max_new_tokens: int) -> tuple[float, str]:
        seconds, out = post(self.url, self.body(prompt, max_new_tokens))
        return seconds, self.text(out)


def loraflow_target(port: int) -> Target:
    return Target(
        "loraflow models serve",
        f"http://127.0.0.1:{port}/v1/completions",
        lambda p, n: {"prompt": p, "max_tokens": n, "temperature": 0},
        lambda out: out["choices"][0]["text"],
    )


def mlflow_target(port: int) -> Target:
    return Target(
        "mlflow models serve",
        f"http://127.0.0.1:{port}/invocations",
        lambda p, n: {"inputs": [p], "params": {"max_new_tokens": n, "do_sample": False}},
        lambda out: out["predictions"][0],
    )


def measure(
    target: Target, prompts: list[str], concurrency: int, max_new_tokens: int
) -> tuple[list[float], float, list[str]]:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: target.one(p, max_new_tokens), prompts))
    wall = time.perf_counter() - started
    return [r[0] for r in results], wall, [r[1] for r in results]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def train_and_register(stack, home: Path, steps: int) -> str:
    from loraflow import registry

    ws = home / "ws"
    ws.mkdir()
    (ws / "job.json").write_text(
        json.dumps(
            {
                "model": {"base_model": str(stack.ensure_tiny_model(corpus=SAMPLE))},
                "data": {"train_path": str(SAMPLE), "eval_path": str(SAMPLE), "data_format": "chat"},
                "training": {
                    "max_steps": steps,
                    "learning_rate": 1e-2,
                    "per_device_train_batch_size": 8,
                    "max_seq_length": 128,
                    "save_steps": 1000,
                },
                "evaluation": {"num_sample_generations": 0},
                "output_dir": "output",
            }
        )
    )
    subprocess.run(
        [str(Path(sys.executable).parent / "loraflow-train"), "--job", str(ws / "job.json")],
        check=True,
        env={**os.environ, **stack.env()},
        stdout=subprocess.DEVNULL,
    )
    return registry.register(
        stack.mlflow_uri,
        name=NAME,
        run_key=f"bench/{NAME}",
        workspace=ws,
        params={},
        tags={},
        gate_metric="eval_loss",
        dataset_source=str(SAMPLE),
    ).version


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=40, help="requests per server and mode (bounded)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per server and mode")
    ap.add_argument("--smoke", action="store_true", help="2 training steps")
    args = ap.parse_args()
    if not 1 <= args.requests <= 1000:
        raise SystemExit("--requests must be between 1 and 1000")

    from loraflow_devstack import LocalStack, free_port

    home = Path(tempfile.mkdtemp(prefix="loraflow-bench-serve-"))
    stack = LocalStack(home=home, repo=common.REPO, mlflow_port=free_port(), airflow_port=free_port())
    procs: list[subprocess.Popen] = []
    try:
        stack.start_mlflow(timeout=600)  # minutes on a loaded machine
        version = train_and_register(stack, home, 2 if args.smoke else 8)
        env = {
            **os.environ,
            **stack.env(),
            "TOKENIZERS_PARALLELISM": "false",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
        lf_port, ml_port = free_port(), free_port()
        ref = f"{NAME}@champion"
        lf_log, ml_log = home / "loraflow-serve.log", home / "mlflow-serve.log"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "loraflow.cli", "models", "serve", ref, "--port", str(lf_port)],
                env=env,
                stdout=lf_log.open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        procs.append(
            subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "mlflow"),
                    "models",
                    "serve",
                    "-m",
                    f"models:/{ref}",
                    "--env-manager",
                    "local",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(ml_port),
                    "--workers",
                    "1",
                ],
                env={**env, "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}"},
                stdout=ml_log.open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        wait_http(f"http://127.0.0.1:{lf_port}/ready", 600, procs[0], lf_log)
        wait_http(f"http://127.0.0.1:{ml_port}/ping", 600, procs[1], ml_log)
        targets = [loraflow_target(lf_port), mlflow_target(ml_port)]
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
        for t in targets:  # warm-up: first-request costs are not what a served model pays per request
            measure(t, PROMPTS[:2], 1, args.max_new_tokens)

        rows: dict[tuple[str, int], dict] = {}
        same: dict[str, list[str]] = {}
        for _ in range(args.rounds):
            for concurrency in (1, args.concurrency):
                for t in targets:
                    lat, wall, texts = measure(t, prompts, concurrency, args.max_new_tokens)
                    row = rows.setdefault((t.label, concurrency), {"latencies": [], "wall": 0.0, "n": 0})
                    row["latencies"] += lat
                    row["wall"] += wall
                    row["n"] += len(lat)
                    same.setdefault(t.label, texts)
        results = [
            {
                "server": label,
                "concurrency": c,
                "requests": r["n"],
                "requests_per_s": r["n"] / r["wall"],
                "p50_ms": 1000 * statistics.median(r["latencies"]),
                "p95_ms": 1000 * pct(r["latencies"], 0.95),
            }
            for (label, c), r in rows.items()
        ]
        texts = list(same.values())
        differ = [
            {"prompt": p, **dict(zip(same, pair, strict=True))}
            for p, *pair in zip(prompts, *texts, strict=True)
            if pair[0] != pair[1]
        ]
        report = {
            "version": f"{NAME}/{version}",
            "max_new_tokens": args.max_new_tokens,
            "rounds": args.rounds,
            "same_completions": not differ,
            "differing": differ[:3],
            "load_average_at_start": os.getloadavg()[0],
            "machine": common.machine(),
            "results": results,
        }
        common.RESULTS.mkdir(parents=True, exist_ok=True)
        (common.RESULTS / "serve.json").write_text(json.dumps(report, indent=2))
        print("| server | clients | requests | requests/s | p50 ms | p95 ms |\n|---|---|---|---|---|---|")
        for r in results:
            print(
                f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} "
                f"| {r['p50_ms']:.0f} | {r['p95_ms']:.0f} |"
            )
        print(
            f"same completions from both: {len(prompts) - len(differ)}/{len(prompts)}; "
            f"load average at start {report['load_average_at_start']:.1f}"
        )
        for d in differ[:3]:
            print(f"  differs: {json.dumps(d, ensure_ascii=False)}")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        stack.stop_all()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
