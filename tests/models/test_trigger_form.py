"""The trigger form and the run it starts, used as a person would: a real Airflow (api-server,
scheduler, dag-processor, LocalExecutor) on its own DB, Airflow's login page, headless
Chromium driven by playwright, the session's MLflow server and the tiny model.

One test submits the form exactly as it opens (its defaults name the bundled sample data and
the tiny model), follows the run to success, reads the train task's log through the UI's own
REST API, and finds the MLflow run's loss history and the loss curve on the loraflow page.
The other types an out-of-range value and sees the refusal before any run exists.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.models.browser import Browser

pytestmark = pytest.mark.slow

DAG_ID = "loraflow_finetune"
USER, PASSWORD = "admin", "trigger-form-pw"
DEFAULT_MODEL = "loraflow-model"  # the form's default registered_model_name
STEP_LINE = re.compile(r"^step (\d+)/(\d+) \((\d+)%\)  loss \d+\.\d{4}  lr \d\.\de-\d+  [\d,]+ tok/s  eta (\d+m)?\d+s$")


@pytest.fixture(scope="module")
def scheduled_airflow(stack, mlflow_server, tiny_model, tmp_path_factory):
    """A scheduled Airflow with the loraflow DAG and plugin; yields its base URL. Stopped at the end."""
    from mlflow import MlflowClient

    from loraflow_devstack import LocalStack, free_port, wait_http

    home = tmp_path_factory.mktemp("scheduled-airflow")
    own = LocalStack(home=stack.home, repo=REPO, mlflow_port=stack.mlflow_port, airflow_port=free_port())
    (home / "passwords.json").write_text(json.dumps({USER: PASSWORD}))
    env = {
        **os.environ,
        **own.env(),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{own.airflow_port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
    }
    env.pop("LORAFLOW_RUNTIME", None)  # the Runtime dropdown's default: the deployment's (local here)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, 'plugins'); from loraflow import gpus; gpus.ensure_pool()",
        ],
        env=env,
        check=True,
        cwd=REPO,
    )
    procs = []
    for component in ("api-server", "scheduler", "dag-processor"):
        extra = (
            ["--host", "127.0.0.1", "--port", str(own.airflow_port), "--workers", "1"]
            if component == "api-server"
            else []
        )
        with (home / f"{component}.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "airflow", component, *extra],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    base = f"http://127.0.0.1:{own.airflow_port}"
    mc = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    try:
        wait_http(f"{base}/api/v2/monitor/health", 180, procs[0], home / "api-server.log")
        token = _token(base)
        deadline = time.monotonic() + 180
        while _api(base, token, f"/api/v2/dags/{DAG_ID}")[0] != 200:  # parsed and serialized by the dag-processor
            assert time.monotonic() < deadline, (home / "dag-processor.log").read_text()[-3000:]
            time.sleep(3)
        yield base
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=60)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
        # The defaults register into the form's default model: other tests count its versions.
        try:
            mc.delete_registered_model(DEFAULT_MODEL)
        except Exception:
            pass


@pytest.fixture
def browser():
    b = Browser(1280, 1000)
    try:
        yield b
    finally:
        b.close()


def _token(base: str) -> str:
    req = urllib.request.Request(
        f"{base}/auth/token",
        data=json.dumps({"username": USER, "password": PASSWORD}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)["access_token"]


def _api(base: str, token: str, path: str) -> tuple[int, dict]:
    req = urllib.request.Request(
        base + path, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def _runs(base: str, token: str) -> list[dict]:
    return _api(base, token, f"/api/v2/dags/{DAG_ID}/dagRuns?limit=100")[1].get("dag_runs", [])


def _open_form(browser: Browser, base: str):
    browser.login(base, USER, PASSWORD)
    browser.open(f"{base}/dags/{DAG_ID}")
    browser.page.get_by_role("button", name="Trigger").first.click()
    dialog = browser.page.get_by_role("dialog")
    dialog.get_by_role("button", name="Runtime").wait_for()
    return dialog


def _shot(browser: Browser, name: str, tmp_path: Path) -> Path:
    shot = browser.screenshot(tmp_path / name)
    if os.environ.get("LORAFLOW_UPDATE_SCREENSHOT"):  # refresh the README's pictures on request
        (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, REPO / "docs" / "img" / name)
    return shot


def test_an_out_of_range_value_is_refused_by_the_form_before_any_run_exists(scheduled_airflow, browser):
    base, token = scheduled_airflow, _token(scheduled_airflow)
    before = _runs(base, token)
    dialog = _open_form(browser, base)
    dialog.get_by_role("button", name="LoRA").click()
    assert dialog.get_by_text("Allowed: 1 to 1,024.").is_visible()  # the range is stated where the person types
    rank = dialog.locator("input[name=element_lora_r]")
    rank.fill("5000")
    dialog.get_by_role("button", name="Trigger").last.click()
    refusal = dialog.get_by_text(
        re.compile(r"Invalid input for param lora_r: 5000 is greater than the maximum of 1024")
    )
    refusal.wait_for(timeout=30_000)
    assert rank.input_value() == "5000"  # kept as typed, not clamped behind the person's back
    assert _runs(base, token) == before


def test_the_form_submitted_with_its_defaults_trains_and_the_log_reads_as_progress(
    scheduled_airflow, browser, mlflow_server, tmp_path
):
    from mlflow import MlflowClient

    from loraflow import registry

    base, token = scheduled_airflow, _token(scheduled_airflow)
    before = {r["dag_run_id"] for r in _runs(base, token)}
    dialog = _open_form(browser, base)
    assert "Required" not in dialog.inner_text() and "This field is required" not in dialog.inner_text()
    dialog.get_by_role("button", name="Runtime").click()
    dialog.get_by_text("deployment default (local)").wait_for()  # the dropdown names its default
    runtime_section = dialog.inner_text().split("\nRuntime\n", 1)[1]
    assert not re.search(r"^null$", runtime_section, re.M), runtime_section
    dialog.get_by_role("button", name="Training").click()
    dialog.get_by_text("Allowed: more than 0, at most 1.").wait_for()  # learning rate: its range, stated
    _shot(browser, "trigger-form.png", tmp_path)
    trigger = dialog.get_by_role("button", name="Trigger").last
    assert trigger.is_enabled()  # as the form opens: every default is valid
    with browser.page.expect_response(
        lambda r: r.url.endswith(f"/dags/{DAG_ID}/dagRuns") and r.request.method == "POST"
    ) as answer:
        trigger.click()
    assert answer.value.status == 200, answer.value.text()
    run_id = answer.value.json()["dag_run_id"]
    assert run_id not in before

    deadline = time.monotonic() + 900
    while (
        state := _api(base, token, f"/api/v2/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id)}")[1].get("state")
    ) not in ("success", "failed"):
        assert time.monotonic() < deadline, state
        time.sleep(5)
    tis = {
        t["task_id"]: t["state"]
        for t in _api(base, token, f"/api/v2/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id)}/taskInstances")[1][
            "task_instances"
        ]
    }
    assert state == "success", tis

    # The train task's log, as the UI's log view reads it.
    status, log = _api(
        base, token, f"/api/v2/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id)}/taskInstances/train/logs/1"
    )
    assert status == 200
    lines = [e["event"] if isinstance(e, dict) else str(e) for e in log["content"]]
    steps = [m for m in map(STEP_LINE.match, lines) if m]
    assert steps, "\n".join(lines[-60:])
    total = int(steps[0][2])
    assert [int(m[1]) for m in steps] == list(range(1, total + 1)) and steps[-1][3] == "100"
    assert not [line for line in lines if line.lstrip().startswith('{"event"')]  # no raw JSON events for people
    assert not [line for line in lines if "gemm_4bit" in line or "FutureWarning" in line]

    # MLflow draws the curve: one loss point per logging step.
    found = registry.mlflow_run_for(mlflow_server, f"{DAG_ID}/{run_id}")
    assert found
    history = MlflowClient(tracking_uri=mlflow_server).get_metric_history(found["run_id"], "loss")
    assert sorted(m.step for m in history) == list(range(1, total + 1))

    # The loraflow page draws it too, next to the version.
    browser.page.set_viewport_size({"width": 1400, "height": 560})
    browser.open(f"{base}/plugin/loraflow")
    frame = "document.querySelector('iframe') && document.querySelector('iframe').contentDocument"
    label = browser.wait_for(
        f"{frame} && {frame}.querySelector('svg.curve') && "
        f"{frame}.querySelector('svg.curve').getAttribute('aria-label')"
    )
    assert label.startswith("train loss") and f"over {total} steps ({total} points)" in label
    assert browser.screenshot(tmp_path / "models-page.png").stat().st_size > 10_000  # the README's picture is test_ui's


def _post(base: str, token: str, path: str, body: dict) -> tuple[int, dict | str]:
    req = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def test_a_rest_conf_outside_the_form_fails_prepare_naming_every_key_and_nothing_runs(scheduled_airflow, stack):
    """Through the REST API, skipping the form: Airflow accepts the conf (HTTP 200), and prepare
    refuses it with one message naming each key the form does not have; no workspace, no
    training. A value the form's schema refuses gets HTTP 400 before a run exists."""
    base, token = scheduled_airflow, _token(scheduled_airflow)
    path = f"/api/v2/dags/{DAG_ID}/dagRuns"
    before = _runs(base, token)
    status, body = _post(base, token, path, {"logical_date": None, "conf": {"lora_r": 5000}})
    assert status == 400 and "lora_r" in str(body), body
    assert _runs(base, token) == before

    conf = {"trust_remote_code": True, "prompt_column": "question", "train_path": "/etc/passwd", "no_such_setting": 1}
    status, run = _post(base, token, path, {"logical_date": None, "conf": conf})
    assert status == 200, run
    run_id = run["dag_run_id"]
    quoted = urllib.parse.quote(run_id)
    deadline = time.monotonic() + 600
    while (state := _api(base, token, f"{path}/{quoted}")[1].get("state")) not in ("success", "failed"):
        assert time.monotonic() < deadline, state
        time.sleep(3)
    tis = {t["task_id"]: t["state"] for t in _api(base, token, f"{path}/{quoted}/taskInstances")[1]["task_instances"]}
    assert state == "failed" and tis["prepare"] == "failed", tis
    assert tis["train"] != "success" and tis["register"] != "success", tis
    status, log = _api(base, token, f"{path}/{quoted}/taskInstances/prepare/logs/1")
    text = "\n".join(
        json.dumps(e) if isinstance(e, dict) else str(e) for e in log["content"]
    )  # the error is in its fields
    refusal = [line for line in text.splitlines() if "no_such_setting" in line]
    assert refusal, text[-3000:]
    assert all(key in refusal[0] for key in conf), refusal[0]  # one message names every key
    from loraflow import workspace

    folder = workspace.run_dir(DAG_ID, run_id)
    assert not (stack.home / "runs" / folder.parent.name / folder.name).exists()  # prepare wrote nothing


def test_a_missing_base_model_is_named_as_a_model_directory(stack, airflow_db):
    from loraflow import workspace
    from loraflow.errors import ParamsError

    with pytest.raises(ParamsError) as caught:
        workspace.prepare(
            {"dataset_path": "examples/data/sample_chat.jsonl", "data_format": "chat", "base_model": "no-such-model"},
            DAG_ID,
            "manual__missing-model",
            "manual",
        )
    message = str(caught.value)
    assert "base_model 'no-such-model' does not exist" in message and "model directory" in message
    assert "upload the file" not in message
