"""When the DAG runs by itself: a cron schedule, new data (an Airflow Asset), or never.

``LORAFLOW_SCHEDULE`` (a cron expression such as ``0 3 * * 0``) and
``LORAFLOW_DATASET_ASSET`` (an asset URI such as ``file:///data/chat.jsonl``, updated by the
producer DAG/task that lands new data) are read when the DAG file is parsed. Both set:
either one triggers a run. Scheduled and asset runs use the params' defaults; a ``file://``
asset is also the default ``dataset_path``, so new data landing there is what retrains.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote, urlsplit

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable


def from_env():
    cron = os.environ.get("LORAFLOW_SCHEDULE", "").strip()
    asset_uri = os.environ.get("LORAFLOW_DATASET_ASSET", "").strip()
    timetable = CronTriggerTimetable(cron, timezone="UTC") if cron else None
    asset = Asset(asset_uri) if asset_uri else None
    if timetable and asset:
        return AssetOrTimeSchedule(timetable=timetable, assets=asset)
    return timetable or asset


def param_defaults() -> dict[str, Any]:
    """Form defaults the schedule implies: a file asset is the dataset that runs train on."""
    uri = urlsplit(os.environ.get("LORAFLOW_DATASET_ASSET", "").strip())
    if uri.scheme == "file" and uri.path:
        return {"dataset_path": unquote(uri.path)}
    return {}
