"""Airflow's plugins-folder entry for loraflow (see ``loraflow.airflow_plugin``)."""

from loraflow.airflow_plugin import LoraflowPlugin

__all__ = ["LoraflowPlugin"]
