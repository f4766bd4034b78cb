"""What a registered version cost to train: its devices, device time, throughput, money.

The trainer records in ``metrics.json`` the device it ran on (``device_name``), how many
processes (one per device, ``device_count``), ``device_seconds`` (training time x devices;
``gpu_seconds`` is the same on GPUs and 0 on a CPU-only run) and
``tokens_per_second_per_device``. ``version_tags`` turns them into model version tags at
registration; with ``LORAFLOW_GPU_HOUR_COST`` set (a price per device-hour, in
``LORAFLOW_COST_CURRENCY``, default USD) the version also carries its cost: device-hours
x that price. ``summary`` is the one line the CLI and the UI page show.
"""

from __future__ import annotations

import os
from typing import Any

DEVICES = "loraflow.devices"
DEVICE_NAME = "loraflow.device_name"
DEVICE_COUNT = "loraflow.device_count"
DEVICE_SECONDS = "loraflow.device_seconds"
GPU_SECONDS = "loraflow.gpu_seconds"
TOKENS_PER_SECOND_PER_DEVICE = "loraflow.tokens_per_second_per_device"
EFFECTIVE_BATCH = "loraflow.effective_batch_size"
COST = "loraflow.cost"
COST_CURRENCY = "loraflow.cost_currency"
GPU_HOUR_COST = "loraflow.gpu_hour_cost"


def hour_cost() -> float | None:
    """LORAFLOW_GPU_HOUR_COST as a number, None when unset; a bad value is an error naming it."""
    raw = os.environ.get("LORAFLOW_GPU_HOUR_COST", "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        from loraflow.errors import ParamsError

        raise ParamsError(
            f"LORAFLOW_GPU_HOUR_COST={raw!r} is not a price per device-hour such as 2.5; fix the worker's environment"
        )
    return value


def version_tags(metrics: dict[str, Any]) -> dict[str, str]:
    """Model version tags from a run's metrics.json (empty for outputs of an older trainer)."""
    if "device_count" not in metrics:
        return {}
    count = int(metrics["device_count"])
    name = str(metrics.get("device_name") or "unknown")
    device_s = float(metrics.get("device_seconds") or 0.0)
    tags = {
        DEVICES: f"{count} x {name}",
        DEVICE_NAME: name,
        DEVICE_COUNT: str(count),
        DEVICE_SECONDS: f"{device_s:.1f}",
        GPU_SECONDS: f"{float(metrics.get('gpu_seconds') or 0.0):.1f}",
        TOKENS_PER_SECOND_PER_DEVICE: f"{float(metrics.get('tokens_per_second_per_device') or 0.0):.1f}",
    }
    if "effective_batch_size" in metrics:
        tags[EFFECTIVE_BATCH] = str(int(metrics["effective_batch_size"]))
    price = hour_cost()
    if price is not None:
        tags.update(
            {
                COST: f"{device_s / 3600 * price:.4f}",
                GPU_HOUR_COST: f"{price:g}",
                COST_CURRENCY: os.environ.get("LORAFLOW_COST_CURRENCY", "USD"),
            }
        )
    return tags


def summary(tags: dict[str, str]) -> str:
    """``2 x NVIDIA H100 80GB HBM3, 3600.0 GPU-s, 1,850 tok/s per device, cost 2.0000 USD`` (or '-')."""
    if DEVICES not in tags:
        return "-"
    gpu_s = float(tags.get(GPU_SECONDS) or 0.0)
    time_part = f"{gpu_s:.1f} GPU-s" if gpu_s else f"{float(tags.get(DEVICE_SECONDS) or 0.0):.1f} device-s (CPU)"
    parts = [tags[DEVICES], time_part, f"{float(tags.get(TOKENS_PER_SECOND_PER_DEVICE) or 0.0):,.0f} tok/s per device"]
    if EFFECTIVE_BATCH in tags:
        parts.append(f"batch {tags[EFFECTIVE_BATCH]}")
    if COST in tags:
        parts.append(f"cost {tags[COST]} {tags.get(COST_CURRENCY, '')}".rstrip())
    return ", ".join(parts)
