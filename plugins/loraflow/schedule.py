"""When the DAG runs by itself: a cron schedule, new data (an Airflow Asset), or never.

``LORAFLOW_SCHEDULE`` (a cron expression such as ``0 3 * * 0``) and
``LORAFLOW_DATASET_ASSET`` (an asset URI such as ``file:///data/chat.jsonl``, updated by the
producer DAG/task that lands new data) are read when the DAG file is parsed. Both set:
either one triggers a run. Scheduled and asset runs use the params' defaults.
"""

from __future__ import annotations

import os

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable


def from_env():
    cron = os.environ.get("LORAFLOW_SCHEDULE", "").strip()
    asset_uri = os.environ.get("LORAFLOW_DATASET_ASSET", "").strip()
    timetable = CronTriggerTimetable(cron, timezone="UTC") if cron else None
    asset = Asset(asset_uri) if asset_uri else None
    if timetable and asset:
        return AssetOrTimeSchedule(timetable=timetable, assets=asset)
    return timetable or asset
