"""The ``AirflowPlugin`` that puts loraflow into the Airflow UI.

It mounts the FastAPI app of ``loraflow.ui`` at ``/loraflow`` on the api-server and adds
"loraflow models" to the Browse menu as an external view (shown in the UI's iframe).
Airflow finds it through ``plugins/loraflow_plugin.py``; ``plugins/.airflowignore`` keeps
Airflow's plugin loader from importing the package's other modules as loose files.
The "MLflow run" extra link (``loraflow.links.MlflowRunLink``) is set on the operators
themselves: Airflow 3 stores the link URL when the task finishes, in the worker.

The UI app is imported only where Airflow asks for the FastAPI apps (the api-server):
schedulers and workers also load plugins, and they need none of it.
"""

from __future__ import annotations

from functools import cached_property

from airflow.plugins_manager import AirflowPlugin

from loraflow.links import URL_PREFIX


class _LazyApps(list):
    """A list that imports the FastAPI app on first read, so only the api-server pays for it."""

    @cached_property
    def _loaded(self) -> list:
        from loraflow.ui.app import app

        return [{"app": app, "url_prefix": URL_PREFIX, "name": "loraflow"}]

    def __iter__(self):
        return iter(self._loaded)

    def __len__(self) -> int:
        return len(self._loaded)

    def __getitem__(self, i):
        return self._loaded[i]

    def __bool__(self) -> bool:
        return True


class LoraflowPlugin(AirflowPlugin):
    name = "loraflow"
    fastapi_apps = _LazyApps()
    external_views = [
        {
            "name": "loraflow models",
            "href": f"{URL_PREFIX}/",
            "destination": "nav",
            "category": "browse",
            "url_route": "loraflow",
        }
    ]
