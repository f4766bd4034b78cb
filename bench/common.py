"""What every benchmark shares: the synthetic data, the bench model, machine facts, output.

The data is deterministic for a seed and has a realistic long-tailed length distribution
(lognormal: many short examples, a few long ones), which is what makes padding expensive.
The bench model is a Llama built from a config with random weights (throughput and
memory do not depend on weight values) and a BPE tokenizer trained on the bench data, so
nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CACHE = RESULTS / "cache"

_SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ne",
    "ru",
    "ta",
    "vo",
    "shi",
    "ben",
    "dor",
    "el",
    "fa",
    "gu",
    "ho",
    "is",
    "ju",
    "pe",
    "qua",
    "sa",
    "to",
    "um",
    "wi",
    "xe",
    "yo",
    "zan",
    "an",
    "er",
    "in",
    "on",
    "ur",
]


def vocabulary(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))))
    return sorted(words)


class TextGen:
    """Zipf-distributed pseudo-words (a natural-language-like token distribution)."""

    def __init__(self, seed: int = 0, vocab_size: int = 3000):
        import numpy as np

        self.words = np.array(vocabulary(vocab_size, seed))
        ranks = np.arange(1, len(self.words) + 1)
        self.p = (1.0 / ranks) / (1.0 / ranks).sum()
        self.rng = np.random.default_rng(seed)

    def lengths(self, n: int, median: float, sigma: float, lo: int = 1, hi: int = 2000):
        import numpy as np

        return np.clip(self.rng.lognormal(np.log(median), sigma, n).astype(int), lo, hi)

    def texts(self, lengths) -> list[str]:
        flat = self.words[self.rng.choice(len(self.words), size=int(sum(lengths)), p=self.p)]
        out, at = [], 0
        for k in lengths:
            out.append(" ".join(flat[at : at + k]))
            at += k
        return out


def prompt_completion_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompts ~20 words median, completions ~30 words median with a long tail (p99 ~ 300 words)."""
    gen = TextGen(seed)
    prompts = gen.texts(gen.lengths(n, median=20, sigma=0.7))
    completions = gen.texts(gen.lengths(n, median=30, sigma=1.0))
    return [{"prompt": p + " ?", "completion": " " + c + "."} for p, c in zip(prompts, completions, strict=True)]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def bench_model(hidden: int = 256, layers: int = 4, heads: int = 4, vocab: int = 2048, max_pos: int = 4096) -> Path:
    """The bench Llama (random weights) + tokenizer, built once into the cache with loraflow's builder."""
    from loraflow_trainer.tiny import build_tiny_model

    out = CACHE / f"llama-h{hidden}-l{layers}-v{vocab}"
    if (out / "config.json").exists():
        return out
    corpus = [r["prompt"] + r["completion"] for r in prompt_completion_rows(4000, seed=123)]
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    build_tiny_model(
        tmp,
        corpus,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        max_position_embeddings=max_pos,
        seed=0,
    )
    tmp.replace(out)
    return out


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_start": load_average(),
    }
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "tokenizers", "pandas", "pandera", "pyarrow"):
        mod = sys.modules.get(name)
        if mod is not None:
            info[name] = getattr(mod, "__version__", "?")
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) + " |" for row in cells]
    return "\n".join(lines)


def write_result(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **payload}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nwrote {path}")
    return path
