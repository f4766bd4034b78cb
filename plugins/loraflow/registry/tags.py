"""The names loraflow writes into MLflow: experiments, version and run tags, aliases, artifact folders.

Every tag key starts with ``loraflow.``. A version's lineage (``LINEAGE_TAGS``) is what
``loraflow models show`` prints and the UI page lists; the alias history's own tags
(``MOVE_PREFIX``, ``ROLLED_BACK``) live in ``aliases``.
"""

from __future__ import annotations

from loraflow_trainer import contract

# Version (and run) tags the register task writes.
RUN_KEY = "loraflow.run_key"  # <dag_id>/<run_id>, no try number: the idempotency key
DAG_ID = "loraflow.dag_id"
RUN_ID = "loraflow.run_id"
FINGERPRINT = "loraflow.data_fingerprint"
SPEC_HASH = "loraflow.spec_hash"
BASE_MODEL = "loraflow.base_model"
IMAGE = "loraflow.image"
IMAGE_DIGEST = "loraflow.image_digest"
GATE_METRIC = "loraflow.gate_metric"
GATE_VALUE = "loraflow.gate_value"
RUNTIME = "loraflow.runtime"
PROMOTION_REASON = "loraflow.promotion_reason"
# Where a version came from, portably: the base as the model cache's name (or hub id@commit)
# with its weights hash, and the code that trained it.
BASE_REF = "loraflow.base_ref"
BASE_SHA256 = "loraflow.base_sha256"
LORAFLOW_VERSION = "loraflow.version"
TRAINER_VERSION = "loraflow.trainer_version"
GIT_COMMIT = "loraflow.git_commit"  # the plugin/DAG checkout that registered the version
TRAINER_GIT_COMMIT = "loraflow.trainer_git_commit"  # the trainer source (local runs; docker: the image digest)
RUN_TIME = "loraflow.run_time"  # the run's logical date (run_after when it has none): aliases move forward in it
ADAPTER_SHA256 = "loraflow.adapter_sha256"  # digest of the registered output's checksums (metadata.json)
ALIAS_NOTE = "loraflow.alias_note"  # why register left an alias where it was
PIPELINE_STATUS = "loraflow.pipeline_status"  # run tag: how the DAG run ended (teardown)

# Who moved an alias by hand (``loraflow models promote``, the UI).
PROMOTED_BY = "loraflow.promoted_by"
PROMOTED_AT = "loraflow.promoted_at"
PROMOTED_ALIAS = "loraflow.promoted_alias"

# A merged export registered as a version of its own model, linked both ways to its adapter version.
SOURCE_MODEL = "loraflow.source_model"
SOURCE_VERSION = "loraflow.source_version"
EXPORT_FORMAT = "loraflow.export_format"
MERGED_VERSION = "loraflow.merged_version"
EXPORT_KEY = "loraflow.export_key"  # not the run key: an export is no DAG run, and the UI groups versions by run key

# What ``show`` reports as a version's lineage: field -> tag.
LINEAGE_TAGS = {
    "dag_id": DAG_ID,
    "run_id": RUN_ID,
    "run_key": RUN_KEY,
    "data_fingerprint": FINGERPRINT,
    "base_model": BASE_MODEL,
    "spec_hash": SPEC_HASH,
    "image": IMAGE,
    "image_digest": IMAGE_DIGEST,
    "runtime": RUNTIME,
    "gate_metric": GATE_METRIC,
    "base_ref": BASE_REF,
    "base_sha256": BASE_SHA256,
    "loraflow_version": LORAFLOW_VERSION,
    "trainer_version": TRAINER_VERSION,
    "git_commit": GIT_COMMIT,
    "trainer_git_commit": TRAINER_GIT_COMMIT,
}

CHAMPION, CHALLENGER = "champion", "challenger"

# Artifact folders of a version's MLflow run (the output's small files sit at its root).
MODEL_ARTIFACT = contract.MODEL_DIR
DATA_ARTIFACTS = "data"  # data_report.json, dataset_schema.json
EVALUATION_ARTIFACTS = "evaluation"  # eval.json, the gate's report


def experiment_name(model_name: str) -> str:
    """The MLflow experiment that holds the runs of registered model ``model_name``."""
    return f"loraflow/{model_name}"
