"""The loraflow page in the Airflow UI, used as a person would: a real api-server, a real login,
headless Chromium, a version registered by a real pipeline run."""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request

import pytest

from tests.conftest import REPO
from tests.models.browser import Browser
from tests.models.conftest import EDITOR, NOBODY, PASSWORD, USER, VIEWER, login

pytestmark = pytest.mark.slow

READ_URLS = (
    "/loraflow/",
    "/loraflow/api/runs",
    "/loraflow/mlflow-run?dag_id=loraflow_finetune&run_id=x",
    "/loraflow/openapi.json",
    "/loraflow/gate-report?name=x&version=1",
)
PROMOTE_MODEL = "ui-promote-demo"  # not the pipeline's model: the tests that read its champion stay as they were
PROMOTE_ROUTE = "/api/models/{name}/versions/{version}/aliases/{alias}"
PROMOTE = f"/loraflow/api/models/{PROMOTE_MODEL}/versions/2/aliases/champion"
PLUGIN_URLS = (*READ_URLS, "POST " + PROMOTE)
REASON = {"reason": "better eval_loss on the held-out set"}


def call(
    base: str,
    path: str,
    token: str | None = None,
    follow: bool = True,
    cookie: str | None = None,
    body: dict | None = None,
):
    """GET ``base + path``, or POST ``body`` as JSON when ``path`` starts with "POST "; (status, headers, text)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    method = "POST" if path.startswith("POST ") else "GET"
    url = base + path.removeprefix("POST ")
    opener = urllib.request.build_opener() if follow else urllib.request.build_opener(NoRedirect)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if cookie:
        headers["Cookie"] = f"_token={cookie}"  # what a browser sends, from any site's form or script
    data = None
    if method == "POST":
        data, headers["Content-Type"] = json.dumps(REASON if body is None else body).encode(), "application/json"
    req = urllib.request.Request(url, headers=headers, data=data, method=method)
    try:
        with opener.open(req, timeout=60) as resp:
            return resp.status, resp.headers, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read().decode()


def get(url: str, token: str | None = None, follow: bool = True):
    return call(url, "", token=token, follow=follow)


def post(url: str, token: str | None = None, cookie: str | None = None, body: dict | None = None):
    return call("", "POST " + url, token=token, cookie=cookie, body=body)


@pytest.fixture(scope="module")
def promotable(registered):
    """PROMOTE_MODEL with two versions (both the pipeline's model) and an MLflow client; removed afterwards."""
    from mlflow import MlflowClient

    mc = MlflowClient(tracking_uri=registered["tracking_uri"], registry_uri=registered["tracking_uri"])
    src = mc.get_model_version(registered["name"], registered["version"])
    mc.create_registered_model(PROMOTE_MODEL)
    try:
        versions = [mc.create_model_version(PROMOTE_MODEL, src.source, run_id=src.run_id).version for _ in range(2)]
        assert versions == ["1", "2"]
        yield mc
    finally:
        mc.delete_registered_model(PROMOTE_MODEL)


@pytest.fixture
def champion_on_v1(promotable):
    """Every test starts from champion -> version 1 of PROMOTE_MODEL; returns a reader of where it points."""
    promotable.set_registered_model_alias(PROMOTE_MODEL, "champion", "1")
    return lambda alias="champion": promotable.get_model_version_by_alias(PROMOTE_MODEL, alias).version


@pytest.mark.parametrize("path", PLUGIN_URLS)
def test_plugin_endpoints_refuse_anonymous_requests(airflow_api, champion_on_v1, path):
    status, _, body = call(airflow_api, path)
    assert status == 401, body
    assert champion_on_v1() == "1"


def test_no_plugin_route_skips_the_permission_check():
    """Every route the app serves carries Airflow's check (FastAPI's docs routes would not: they are off)."""
    from fastapi.routing import APIRoute

    from loraflow.ui.app import app

    routes = [r for r in app.routes if isinstance(r, APIRoute)]
    assert {r.path for r in routes} >= {"/", "/api/runs", "/mlflow-run", "/openapi.json", "/gate-report", PROMOTE_ROUTE}
    assert len(routes) == len(app.routes)  # nothing mounted beside them (no /docs, /redoc)
    app_check = app.router.dependencies[0].dependency
    assert app_check.__qualname__.startswith("requires_access_dag")
    for route in routes:
        assert route.dependant.dependencies[0].call is app_check, route.path


@pytest.mark.parametrize("path", PLUGIN_URLS)
def test_plugin_endpoints_refuse_a_signed_in_user_without_permission_to_read_dag_runs(
    airflow_api, champion_on_v1, path
):
    token = login(airflow_api, NOBODY, PASSWORD)  # a valid login, but no role: no DAG run access
    status, _, body = call(airflow_api, path, token=token)
    assert status == 403, body
    assert get(airflow_api + "/api/v2/dags", token=token)[0] == 403  # Airflow's own API agrees
    assert champion_on_v1() == "1"


def test_a_read_only_viewer_may_read_the_plugin_pages_but_not_move_an_alias(airflow_api, registered, champion_on_v1):
    token = login(airflow_api, VIEWER, PASSWORD)
    status, _, body = get(airflow_api + "/loraflow/api/runs", token=token)
    assert status == 200 and registered["run_key"] in body
    status, _, body = get(airflow_api + "/loraflow/", token=token)
    assert status == 200 and registered["name"] in body

    status, _, body = post(airflow_api + PROMOTE, token=token)
    assert status == 403, body
    assert champion_on_v1() == "1"  # the alias did not move


@pytest.mark.parametrize("path", [PLUGIN_URLS[1], PLUGIN_URLS[-1]])
def test_plugin_endpoints_refuse_a_forged_token(airflow_api, champion_on_v1, path):
    status, _, _ = call(airflow_api, path, token="not.a.jwt")
    assert status == 403  # Airflow: "Invalid JWT token"
    assert champion_on_v1() == "1"


@pytest.mark.parametrize("who", [EDITOR, USER])  # role user (the least that may) and admin
def test_a_user_allowed_to_edit_dag_runs_moves_the_alias_with_a_bearer_token(
    airflow_api, champion_on_v1, promotable, who
):
    token = login(airflow_api, who, PASSWORD)
    status, _, body = post(airflow_api + PROMOTE, token=token)
    assert status == 200, body
    assert json.loads(body) == {
        "name": PROMOTE_MODEL,
        "version": "2",
        "alias": "champion",
        "previous_version": "1",
        "promoted_by": who,
        "reason": REASON["reason"],
    }
    assert champion_on_v1() == "2"  # really moved in MLflow
    tags = promotable.get_model_version(PROMOTE_MODEL, "2").tags
    assert tags["loraflow.promoted_by"] == who and tags["loraflow.promotion_reason"] == REASON["reason"]

    status, _, body = post(airflow_api + PROMOTE.replace("champion", "challenger"), token=token)
    assert status == 200 and json.loads(body)["previous_version"] is None  # a new alias
    assert champion_on_v1("challenger") == "2"
    promotable.delete_registered_model_alias(PROMOTE_MODEL, "challenger")


def test_a_cookie_alone_cannot_move_an_alias(airflow_api, champion_on_v1):
    """The browser sends the _token cookie with any request, a forged cross-site one too: writes need the header."""
    token = login(airflow_api)  # admin
    status, _, body = call(airflow_api, "/loraflow/api/runs", cookie=token)
    assert status == 200  # the cookie is fine for reading
    status, _, body = post(airflow_api + PROMOTE, cookie=token)
    assert status == 403
    assert "accepts only a bearer token" in json.loads(body)["detail"]
    assert champion_on_v1() == "1"


@pytest.mark.parametrize(
    "path, body, code, says",
    [
        (
            "/loraflow/api/models/no-such-model/versions/1/aliases/champion",
            REASON,
            404,
            "no registered model named 'no-such-model'",
        ),
        (
            f"/loraflow/api/models/{PROMOTE_MODEL}/versions/42/aliases/champion",
            REASON,
            404,
            "has no version 42 (versions: 1, 2)",
        ),
        (f"/loraflow/api/models/{PROMOTE_MODEL}/versions/two/aliases/champion", REASON, 400, "is not a version number"),
        (f"/loraflow/api/models/{PROMOTE_MODEL}/versions/2/aliases/latest", REASON, 400, "is not a valid alias"),
        (f"/loraflow/api/models/{PROMOTE_MODEL}/versions/2/aliases/v1", REASON, 400, "refused to set alias 'v1'"),
        (PROMOTE, {"reason": "  "}, 400, "a promotion needs a reason"),
        (PROMOTE, {}, 422, "reason"),
    ],
)
def test_a_promotion_of_what_is_not_there_or_not_allowed_says_why(airflow_api, champion_on_v1, path, body, code, says):
    status, _, text = post(airflow_api + path, token=login(airflow_api), body=body)
    assert status == code and says in text, text
    assert champion_on_v1() == "1"


def test_promotion_says_which_tracking_server_is_down(airflow_db, monkeypatch, free_dead_uri):
    """The api-server's MLflow cannot be stopped for one test; the route itself is called against a dead URI."""
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi import HTTPException

    from loraflow.ui import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", free_dead_uri)
    with pytest.raises(HTTPException) as caught:
        app.promote_version(
            PROMOTE_MODEL,
            "2",
            "champion",
            app.Promotion(**REASON),
            SimpleAuthManagerUser(username="admin", role="admin"),
        )
    assert caught.value.status_code == 503
    assert f"cannot reach the MLflow tracking server at {free_dead_uri}" in caught.value.detail


def test_signed_in_user_sees_the_registered_version_in_the_airflow_ui(airflow_api, registered, tmp_path):
    token = login(airflow_api)
    status, _, body = get(airflow_api + "/loraflow/api/runs", token=token)
    assert status == 200 and registered["run_key"] in body

    browser = Browser(1400, 560)
    try:
        browser.set_cookie(airflow_api, "_token", token)  # what Airflow's login page leaves in the browser
        browser.open(f"{airflow_api}/plugin/loraflow")  # the nav entry: Airflow's UI with our page in its iframe
        frame = "document.querySelector('iframe') && document.querySelector('iframe').contentDocument"
        text = browser.wait_for(
            f"{frame} && {frame}.body && {frame}.body.innerText.includes({registered['name']!r}) && "
            f"{frame}.body.innerText"
        )
        assert f"v{registered['version']}" in text and "champion" in text and "eval_loss" in text
        href = browser.js(
            f"[...{frame}.querySelectorAll('a')].map(a => a.href)"
            f".find(h => h.includes('/runs/{registered['mlflow_run_id']}'))"
        )
        assert href and href.startswith(registered["tracking_uri"])  # the link to the MLflow run
        assert browser.js("document.body.innerText").count("Browse")  # inside Airflow's own chrome
        shot = browser.screenshot(tmp_path / "models-page.png")
    finally:
        browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("LORAFLOW_UPDATE_SCREENSHOT"):  # refresh the README's picture on request
        (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, REPO / "docs" / "img" / "models-page.png")


def test_the_page_links_each_version_s_gate_report_and_serves_it_without_scripts(airflow_api, registered):
    token = login(airflow_api, VIEWER, PASSWORD)
    status, _, html = get(airflow_api + "/loraflow/", token=token)
    assert status == 200, html
    link = f"/loraflow/gate-report?name={registered['name']}&amp;version={registered['version']}"
    assert link in html  # the report register logged in the version's MLflow run
    status, headers, report = get(airflow_api + link.replace("&amp;", "&"), token=token)
    assert status == 200, report
    assert f"Gate: {registered['name']} v{registered['version']}" in report and "<svg" in report
    assert "sandbox" in headers["Content-Security-Policy"] and "script-src" not in headers["Content-Security-Policy"]
    status, _, body = get(airflow_api + f"/loraflow/gate-report?name={registered['name']}&version=999", token=token)
    assert status == 404 and "has no gate report" in body


def test_mlflow_run_extra_link_leads_to_the_run_of_that_dag_run(airflow_api, registered):
    from airflow.models.taskinstancekey import TaskInstanceKey

    from loraflow.links import MlflowRunLink

    dag_id, run_id = registered["run_key"].split("/", 1)
    link = MlflowRunLink().get_link(None, ti_key=TaskInstanceKey(dag_id, "register", run_id, 1))
    assert link.startswith("/loraflow/mlflow-run?")
    status, headers, _ = get(airflow_api + link, token=login(airflow_api), follow=False)
    assert status == 307
    assert headers["Location"].endswith(f"/runs/{registered['mlflow_run_id']}")

    status, _, body = get(
        airflow_api + "/loraflow/mlflow-run?dag_id=loraflow_finetune&run_id=never-ran",
        token=login(airflow_api),
        follow=False,
    )
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
    tasks = {
        (t.get("__var") or t)["task_id"]: (t.get("__var") or t) for t in DagSerialization.to_dict(dag)["dag"]["tasks"]
    }
    for task_id in ("train", "register"):
        assert tasks[task_id].get("_operator_extra_links") == {"MLflow run": "_link_MlflowRunLink"}, (
            f"{task_id} has no 'MLflow run' extra link: set operator_extra_links = (MlflowRunLink(),)"
        )


def test_page_still_lists_the_runs_and_says_why_when_mlflow_is_down(airflow_db, registered, free_dead_uri):
    from airflow.utils.session import create_session

    from loraflow.ui import data, page

    with create_session() as session:
        html = page.render(data.overview(session, tracking_uri=free_dead_uri))
    assert registered["run_key"].split("/", 1)[1] in html  # the DAG run, from Airflow's DB
    assert f"cannot reach the MLflow tracking server at {free_dead_uri}" in html
