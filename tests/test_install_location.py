"""Where pip installs loraflow does not matter: a wheel in a fresh venv, far from the checkout,
still finds the bundled examples, so the form's default dataset_path resolves (the stack's
Airflow image installs it that way; scheduled runs use the defaults)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The loraflow wheel as pip builds it from the checkout."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
        cwd=out,
    )
    return next(out.glob("loraflow-*.whl"))


def test_the_wheel_ships_the_plugin_and_not_the_dev_tooling(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "loraflow/params.py" in names and "loraflow/airflow_plugin.py" in names
    assert not [n for n in names if "devstack" in n], names  # the local stack lives in devtools/, for the checkout


def test_a_wheel_install_outside_the_checkout_finds_the_bundled_examples(wheel, tmp_path):
    from loraflow import params

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAFLOW_", "PYTHON"))}
    out = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import json, loraflow.config as c; print(json.dumps({'module': c.__file__, "
            "'examples': str(c.examples_dir()), 'root': str(c.repo_root()), "
            "'roots': [str(r) for r in c.data_roots()]}))",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    ).stdout
    found = json.loads(out)
    assert Path(found["module"]).is_relative_to(venv)
    default = params.build_params()["dataset_path"].value
    dataset = Path(found["root"]) / default
    assert dataset.is_file() and dataset.is_relative_to(venv), found
    assert dataset.read_bytes() == (REPO / default).read_bytes()
    assert found["examples"] in found["roots"]  # inside an allowed data root, as confine() requires


def test_loraflow_examples_names_the_examples_explicitly(tmp_path, monkeypatch):
    from loraflow import config

    (tmp_path / "examples" / "data").mkdir(parents=True)
    monkeypatch.setenv("LORAFLOW_EXAMPLES", str(tmp_path / "examples"))
    assert config.examples_dir() == tmp_path / "examples"
    assert config.repo_root() == tmp_path
