"""``loraflow models serve``: a subprocess answering real HTTP, the greedy text of ``generate``, following its alias."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Any

import pytest

from loraflow.cli import main

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "What is 3 plus 4?"]


def http(method: str, url: str, body: dict | None = None) -> tuple[int, dict, Any]:
    """(status, JSON body, headers: case-insensitive ``headers["X-Name"]``) of one request."""
    req = urllib.request.Request(
        url,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.load(resp), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc), exc.headers


@contextmanager
def serving(uri: str, ref: str, *extra: str):
    """``loraflow models serve REF`` in a child process; yields (base URL, process) once /ready answers 200."""
    from loraflow_devstack import free_port

    port = free_port()
    log = tempfile.NamedTemporaryFile(
        "w+", prefix="loraflow-serve-", suffix=".log"
    )  # a file: a full pipe would block the server
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loraflow.cli",
            "--tracking-uri",
            uri,
            "models",
            "serve",
            ref,
            "--port",
            str(port),
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    proc.log = log
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"serve exited {proc.returncode}: {output(proc)[-2000:]}"
            try:
                if http("GET", f"{base}/ready")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "serve never became ready"
            time.sleep(0.5)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def output(proc) -> str:
    proc.log.seek(0)
    return proc.log.read()


def generated(capsys, ref: str, prompt: str, *flags: str) -> str:
    code = main(["models", "generate", ref, "--prompt", prompt, "--max-new-tokens", "8", "--json", *flags])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)["completion"]


def test_serve_answers_over_http_with_the_same_greedy_completion_as_generate(registered, capsys):
    ref = f"{registered['name']}@champion"
    expected_chat = {p: generated(capsys, ref, p) for p in PROMPTS}  # chat template applied (the tiny model has one)
    expected_raw = generated(capsys, ref, PROMPTS[0], "--raw")
    with serving(registered["tracking_uri"], ref) as (base, proc):
        assert http("GET", f"{base}/health")[:2] == (200, {"status": "ok"})
        status, models, _ = http("GET", f"{base}/v1/models")
        assert (
            status == 200
            and models["data"][0]["id"] == registered["name"]
            and models["data"][0]["version"] == registered["version"]
        )

        for prompt, want in expected_chat.items():
            status, body, headers = http(
                "POST",
                f"{base}/v1/chat/completions",
                {
                    "model": registered["name"],
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 8,
                    "temperature": 0,
                },
            )
            assert status == 200, body
            assert body["choices"][0]["message"] == {"role": "assistant", "content": want}
            assert headers["X-Loraflow-Model-Version"] == f"{registered['name']}/{registered['version']}"
            assert body["usage"]["completion_tokens"] <= 8

        status, body, _ = http(
            "POST", f"{base}/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
        )
        assert status == 200 and body["choices"][0]["text"] == expected_raw and body["object"] == "text_completion"

        # generation params are honoured: fewer tokens asked, fewer given; a stop string cuts the text
        status, one, _ = http(
            "POST", f"{base}/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 1, "temperature": 0}
        )
        assert status == 200 and one["usage"]["completion_tokens"] == 1
        if len(expected_raw) > 2:
            stop = expected_raw[1:3]
            status, cut, _ = http(
                "POST",
                f"{base}/v1/completions",
                {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "stop": [stop]},
            )
            assert (
                cut["choices"][0]["text"] == expected_raw[: expected_raw.index(stop)]
                and cut["choices"][0]["finish_reason"] == "stop"
            )

        # bad requests get OpenAI-style errors naming the field
        status, err, _ = http("POST", f"{base}/v1/completions", {"prompt": "x", "stream": True})
        assert status == 400 and err["error"]["param"] == "stream"
        status, err, _ = http("POST", f"{base}/v1/completions", {"prompt": "x", "max_tokens": 10**6})
        assert status == 400 and "max_tokens" in err["error"]["message"]
        status, err, _ = http(
            "POST",
            f"{base}/v1/chat/completions",
            {"model": "someone-else", "messages": [{"role": "user", "content": "x"}]},
        )
        assert status == 404 and "someone-else" in err["error"]["message"]

        proc.send_signal(signal.SIGTERM)  # a clean stop: exit 0 and a last line saying so
        assert proc.wait(timeout=60) == 0
        assert "loraflow serve: stopped" in output(proc)


def test_alias_move_and_reload_change_the_answering_version_without_a_restart(registered, train_version, capsys):
    from loraflow import registry

    name = "serve-reload-demo"
    first, second = train_version(name, seed=1), train_version(name, seed=2, steps=8)
    uri = registered["tracking_uri"]
    registry.promote(uri, name, first, "champion", "test: start on the first")
    ask = {"messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 8, "temperature": 0}
    with serving(uri, f"{name}@champion") as (base, proc):
        assert http("POST", f"{base}/v1/chat/completions", ask)[2]["X-Loraflow-Model-Version"] == f"{name}/{first}"

        registry.promote(uri, name, second, "champion", "test: move to the second")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 180
        while http("GET", f"{base}/ready")[1]["version"] != second:
            assert time.monotonic() < deadline and proc.poll() is None, "SIGHUP did not load the new champion"
            time.sleep(0.5)
        status, body, headers = http("POST", f"{base}/v1/chat/completions", ask)
        assert status == 200 and headers["X-Loraflow-Model-Version"] == f"{name}/{second}"
        assert body["choices"][0]["message"]["content"] == generated(capsys, f"{name}/{second}", PROMPTS[1])

        assert http("POST", f"{base}/admin/reload")[1] == {"changed": False, "version": second, "previous": second}
        registry.promote(uri, name, first, "champion", "test: roll back")
        status, result, _ = http("POST", f"{base}/admin/reload")
        assert status == 200 and result == {"changed": True, "version": first, "previous": second}
        assert http("POST", f"{base}/v1/chat/completions", ask)[2]["X-Loraflow-Model-Version"] == f"{name}/{first}"
        assert proc.poll() is None  # the same process throughout


def test_serve_with_a_missing_base_fails_before_listening(registered, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loraflow.cli",
            "--tracking-uri",
            registered["tracking_uri"],
            "models",
            "serve",
            f"{registered['name']}@champion",
            "--base-model-path",
            str(tmp_path / "nowhere"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "expected, not found" in proc.stderr and str(tmp_path / "nowhere") in proc.stderr
    assert "Traceback" not in proc.stderr
