"""The loraflow page in the Airflow UI, used as a person would: a real api-server, a real login,
headless Chromium, a version registered by a real pipeline run."""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.models.browser import Browser
from tests.models.conftest import NOBODY, PASSWORD, VIEWER, login

pytestmark = pytest.mark.slow

PLUGIN_URLS = ("/loraflow/", "/loraflow/api/runs", "/loraflow/mlflow-run?dag_id=loraflow_finetune&run_id=x")


def get(url: str, token: str | None = None, follow: bool = True):
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener() if follow else urllib.request.build_opener(NoRedirect)
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with opener.open(req, timeout=60) as resp:
            return resp.status, resp.headers, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read().decode()


@pytest.mark.parametrize("path", PLUGIN_URLS)
def test_plugin_endpoints_refuse_anonymous_requests(airflow_api, path):
    status, _, _ = get(airflow_api + path)
    assert status in (401, 403)


@pytest.mark.parametrize("path", PLUGIN_URLS)
def test_plugin_endpoints_refuse_a_signed_in_user_without_permission_to_read_dag_runs(airflow_api, path):
    token = login(airflow_api, NOBODY, PASSWORD)  # a valid login, but no role: no DAG run access
    status, _, body = get(airflow_api + path, token=token)
    assert status == 403, body
    assert get(airflow_api + "/api/v2/dags", token=token)[0] == 403  # Airflow's own API agrees


def test_a_read_only_viewer_may_read_the_plugin_pages(airflow_api, registered):
    token = login(airflow_api, VIEWER, PASSWORD)
    status, _, body = get(airflow_api + "/loraflow/api/runs", token=token)
    assert status == 200 and registered["run_key"] in body


def test_plugin_endpoints_refuse_a_forged_token(airflow_api):
    status, _, _ = get(airflow_api + "/loraflow/api/runs", token="not.a.jwt")
    assert status in (401, 403)


def test_signed_in_user_sees_the_registered_version_in_the_airflow_ui(airflow_api, registered, tmp_path):
    token = login(airflow_api)
    status, _, body = get(airflow_api + "/loraflow/api/runs", token=token)
    assert status == 200 and registered["run_key"] in body

    browser = Browser(1400, 560)
    try:
        browser.set_cookie(airflow_api, "_token", token)  # what Airflow's login page leaves in the browser
        browser.open(f"{airflow_api}/plugin/loraflow")  # the nav entry: Airflow's UI with our page in its iframe
        frame = "document.querySelector('iframe') && document.querySelector('iframe').contentDocument"
        text = browser.wait_for(f"{frame} && {frame}.body && {frame}.body.innerText.includes({registered['name']!r}) && {frame}.body.innerText")
        assert f"v{registered['version']}" in text and "champion" in text and "eval_loss" in text
        href = browser.js(f"[...{frame}.querySelectorAll('a')].map(a => a.href).find(h => h.includes('/runs/{registered['mlflow_run_id']}'))")
        assert href and href.startswith(registered["tracking_uri"])  # the link to the MLflow run
        assert browser.js("document.body.innerText").count("Browse")  # inside Airflow's own chrome
        shot = browser.screenshot(tmp_path / "models-page.png")
    finally:
        browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("LORAFLOW_UPDATE_SCREENSHOT"):  # refresh the README's picture on request
        (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, REPO / "docs" / "img" / "models-page.png")


def test_mlflow_run_extra_link_leads_to_the_run_of_that_dag_run(airflow_api, registered):
    from airflow.models.taskinstancekey import TaskInstanceKey

    from loraflow.links import MlflowRunLink

    dag_id, run_id = registered["run_key"].split("/", 1)
    link = MlflowRunLink().get_link(None, ti_key=TaskInstanceKey(dag_id, "register", run_id, 1))
    assert link.startswith("/loraflow/mlflow-run?")
    status, headers, _ = get(airflow_api + link, token=login(airflow_api), follow=False)
    assert status == 307
    assert headers["Location"].endswith(f"/runs/{registered['mlflow_run_id']}")

    status, _, body = get(airflow_api + "/loraflow/mlflow-run?dag_id=loraflow_finetune&run_id=never-ran",
                          token=login(airflow_api), follow=False)
    assert status == 404 and "has not logged to MLflow yet" in body


def test_airflow_loads_only_the_loraflow_plugin_from_the_plugins_folder():
    from airflow._shared.plugins_manager import _load_plugins_from_plugin_directory

    plugins, errors = _load_plugins_from_plugin_directory(str(REPO / "plugins"))
    assert errors == {}
    assert [p.name for p in plugins] == ["loraflow"]
    assert str(plugins[0].source) == "$PLUGINS_FOLDER/loraflow_plugin.py"  # not registry.py etc. as loose modules


def test_train_and_register_tasks_carry_the_mlflow_run_link(airflow_db):
    """The DAG wires ``MlflowRunLink`` onto both tasks; Airflow stores the link when each finishes."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    dag = DagBag(dag_folder=str(REPO / "dags")).get_dag("loraflow_finetune")
    tasks = {(t.get("__var") or t)["task_id"]: (t.get("__var") or t) for t in DagSerialization.to_dict(dag)["dag"]["tasks"]}
    for task_id in ("train", "register"):
        assert tasks[task_id].get("_operator_extra_links") == {"MLflow run": "_link_MlflowRunLink"}, (
            f"{task_id} has no 'MLflow run' extra link: set operator_extra_links = (MlflowRunLink(),)")


def test_page_still_lists_the_runs_and_says_why_when_mlflow_is_down(airflow_db, registered, free_dead_uri):
    from airflow.utils.session import create_session

    from loraflow.ui import data, page

    with create_session() as session:
        html = page.render(data.overview(session, tracking_uri=free_dead_uri))
    assert registered["run_key"].split("/", 1)[1] in html  # the DAG run, from Airflow's DB
    assert f"cannot reach the MLflow tracking server at {free_dead_uri}" in html
