"""The trainer image as a user and the DockerOperator meet it: labels, user, CLI, exit codes."""

from __future__ import annotations

import json

from tests.docker.conftest import trainer_version


def run(docker_client, image, command, **kwargs) -> tuple[int, str, str]:
    """Run a throwaway container to completion; (exit code, stdout, stderr)."""
    c = docker_client.containers.run(image, command, detach=True, network_mode="none", **kwargs)
    try:
        code = c.wait(timeout=300)["StatusCode"]
        return code, c.logs(stdout=True, stderr=False).decode(), c.logs(stdout=False, stderr=True).decode()
    finally:
        c.remove(force=True)


def test_image_records_its_version_and_git_commit(docker_client, trainer_image):
    labels = docker_client.images.get(trainer_image).labels
    assert labels["org.opencontainers.image.version"] == trainer_version()
    revision = labels["org.opencontainers.image.revision"]
    assert revision != "unknown" and len(revision.removesuffix("-dirty")) == 40


def test_trainer_runs_as_non_root_in_workspace_with_hf_cache_offline(docker_client, trainer_image):
    code, out, err = run(
        docker_client,
        trainer_image,
        ["sh", "-c", 'id -u; id -g; pwd; echo "$HF_HOME $HF_HUB_OFFLINE"; touch /hf-cache/probe && echo writable'],
    )
    assert code == 0, err
    assert out.split() == ["1000", "1000", "/workspace", "/hf-cache", "1", "writable"]


def test_final_image_has_no_build_tools(docker_client, trainer_image):
    code, out, _ = run(
        docker_client,
        trainer_image,
        ["sh", "-c", "for t in gcc cc make pip pip3 apt-get; do command -v $t >/dev/null && echo found:$t; done; true"],
    )
    assert code == 0
    # apt-get stays (it is part of the base OS); compilers and pip do not.
    assert [line for line in out.split() if line != "found:apt-get"] == []


def test_help_lists_the_exit_codes(docker_client, trainer_image):
    code, out, _ = run(docker_client, trainer_image, ["loraflow-train", "--help"])
    assert code == 0
    assert "--job" in out and "2 = the job spec is invalid" in out


def test_training_stack_imports_on_cpu(docker_client, trainer_image):
    probe = (
        "import json, torch, transformers, peft, accelerate, bitsandbytes, opacus, mlflow, pandas, pyarrow;"
        "print(json.dumps({'torch': torch.__version__, 'cuda': torch.cuda.is_available(), 'peft': peft.__version__}))"
    )
    code, out, err = run(docker_client, trainer_image, ["python", "-c", probe])
    assert code == 0, err[-2000:]
    info = json.loads(out.strip().splitlines()[-1])
    assert info["torch"].startswith("2.13.0") and info["cuda"] is False and info["peft"] == "0.21.2"


def test_bad_job_exits_2_with_a_one_line_cause(docker_client, trainer_image, tmp_path):
    (tmp_path / "job.json").write_text(json.dumps({"model": {"base_model": ""}, "lora": {"lora_r": -3}}))
    tmp_path.chmod(0o755)  # the container's uid 1000 reads it
    code, out, err = run(
        docker_client,
        trainer_image,
        ["loraflow-train", "--job", "/workspace/job.json"],
        volumes={str(tmp_path): {"bind": "/workspace", "mode": "ro"}},
    )
    assert code == 2, (out, err)
    assert "loraflow-train: error:" in err and "Traceback" not in err
