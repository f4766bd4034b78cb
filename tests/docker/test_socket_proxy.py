"""The compose stack's Docker socket proxy (deploy/socket-proxy/haproxy.cfg) against the real
engine: the calls a training task makes go through, everything else is refused.

Runs the config in the host's haproxy (Debian package `haproxy`; skipped without it)."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from loraflow_devstack import free_port
from tests.conftest import REPO


@pytest.fixture
def proxy_url(tmp_path, docker_client):
    haproxy = shutil.which("haproxy")
    if not haproxy:
        pytest.skip("haproxy is not installed (apt-get install haproxy) to run the socket proxy config")
    port = free_port()
    cfg = (REPO / "deploy" / "socket-proxy" / "haproxy.cfg").read_text().replace("bind :2375", f"bind 127.0.0.1:{port}")
    (tmp_path / "haproxy.cfg").write_text(cfg)
    proc = subprocess.Popen(
        [haproxy, "-db", "-f", str(tmp_path / "haproxy.cfg")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        yield f"tcp://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_trainer_calls_pass_and_exec_or_pull_are_refused(proxy_url, trainer_image):
    import docker
    from docker.errors import APIError

    client = docker.APIClient(base_url=proxy_url, timeout=60)
    assert client.ping()
    assert client.images(name=trainer_image)  # DockerOperator's "is the image here" check
    container = client.create_container(
        trainer_image,
        ["loraflow-train", "--help"],
        labels={"loraflow.run_id": "proxy-test"},
        host_config=client.create_host_config(network_mode="none"),
    )
    try:
        stream = client.attach(container["Id"], stdout=True, stderr=True, stream=True)
        client.start(container["Id"])
        output = b"".join(stream)
        assert client.wait(container["Id"])["StatusCode"] == 0
        assert b"--job" in output
        assert client.containers(all=True, filters={"label": "loraflow.run_id=proxy-test"})
        with pytest.raises(APIError) as refused:
            client.exec_create(container["Id"], ["id"])
        assert refused.value.response.status_code == 403
        with pytest.raises(APIError) as refused:
            client.pull("busybox", tag="latest")
        assert refused.value.response.status_code == 403
    finally:
        client.remove_container(container["Id"], force=True)
    assert not client.containers(all=True, filters={"label": "loraflow.run_id=proxy-test"})
