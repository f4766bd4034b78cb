"""The base model a version was trained on, recorded portably, and found again on any host.

A loraflow version holds only the LoRA adapter. Its base is recorded as a *reference*
(``reference()``): a hub id plus revision, or the model cache's relative name
(``tiny-llama`` for ``$LORAFLOW_MODELS/tiny-llama`` on the host and ``/models/tiny-llama``
in the container) plus a content hash of the weight files. ``resolve()`` finds the
reference on this host (a given path, else ``$LORAFLOW_MODELS/<name>``, else the path it
was trained at) and refuses a base whose weights hash differs.

The hash is the sha256 of ``sha256sum``'s output over the sorted weight files, so it can
be checked by hand::

    cd $LORAFLOW_MODELS/tiny-llama && find . -type f \\( -name '*.safetensors' -o -name '*.bin' \\
        -o -name '*.pt' -o -name '*.pth' -o -name '*.gguf' \\) | sed 's|^./||' | LC_ALL=C sort \\
        | xargs sha256sum | sha256sum

This file is stdlib-only on purpose: the trainer copies it into every MLflow model it saves
(``code/loraflow_base_model.py``) and points the model's pyfunc loader at it, so plain
``mlflow.pyfunc.load_model("models:/NAME@champion")`` resolves the base on the loading
host without loraflow installed there (``_load_pyfunc`` below; MLflow imports it).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from loraflow_trainer import contract

REF_KEY = "loraflow.base"  # the MLflow model's metadata key holding the reference
MODELS_ENV = "LORAFLOW_MODELS"  # the model cache on this host
BASE_PATH_ENV = "LORAFLOW_BASE_MODEL_PATH"  # an explicit base directory for the pyfunc loader
CONTAINER_MODELS = "/models"  # the model cache as the trainer container sees it
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
BUNDLED_MODULE = "loraflow_base_model"  # this file's name inside an MLflow model's code/ directory

_memo: dict[tuple, str] = {}


class BaseModelError(RuntimeError):
    """The recorded base model is not on this host, or is not the same weights."""


def weight_files(model_dir: Path) -> list[str]:
    model_dir = Path(model_dir)
    return sorted(
        p.relative_to(model_dir).as_posix()
        for p in model_dir.rglob("*")
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES and ".cache" not in p.relative_to(model_dir).parts
    )


def weights_sha256(model_dir: Path) -> str:
    """sha256 over ``<sha256>  <path>`` lines of the sorted weight files (memoised by size and mtime)."""
    model_dir = Path(model_dir).resolve()
    files = weight_files(model_dir)
    if not files:
        raise BaseModelError(
            f"{model_dir} holds no weight files ({', '.join(WEIGHT_SUFFIXES)}); it is not a saved model"
        )
    key = (str(model_dir), *((f, (model_dir / f).stat().st_size, (model_dir / f).stat().st_mtime_ns) for f in files))
    if key not in _memo:
        lines = "".join(f"{file_sha256(model_dir / f)}  {f}\n" for f in files)
        _memo[key] = hashlib.sha256(lines.encode()).hexdigest()
    return _memo[key]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_roots() -> list[Path]:
    """Model caches to name a base relative to: ``$LORAFLOW_MODELS`` and the container's ``/models``."""
    roots = [Path(os.environ[MODELS_ENV])] if os.environ.get(MODELS_ENV) else []
    return [*roots, Path(CONTAINER_MODELS)]


def reference(
    base_model: str, model_dir: Path | None, revision: str | None = None, commit: str | None = None
) -> dict[str, Any]:
    """The portable reference of a base: ``{"kind": "hub", ...}`` or ``{"kind": "cache", "name", "sha256", ...}``."""
    if model_dir is None:
        return {"kind": "hub", "id": base_model, "revision": commit or revision or "main"}
    model_dir = Path(model_dir).resolve()
    name = model_dir.name
    for root in cache_roots():
        try:
            name = model_dir.relative_to(root.resolve()).as_posix()
            break
        except ValueError:
            continue
    return {
        "kind": "cache",
        "name": name,
        "sha256": weights_sha256(model_dir),
        "files": weight_files(model_dir),
        "trained_at": str(model_dir),
    }


def candidates(ref: dict[str, Any], given: str | Path | None = None, cache: str | Path | None = None) -> list[Path]:
    """Where ``resolve`` looks, in order: the given path alone, else the cache (``$LORAFLOW_MODELS``), then the
    training path."""
    if given:
        return [Path(given).expanduser()]
    out = []
    cache = cache or os.environ.get(MODELS_ENV)
    if cache:
        out.append(Path(cache).expanduser() / ref["name"])
    if ref.get("trained_at"):
        out.append(Path(ref["trained_at"]))
    seen: list[Path] = []
    for p in out:
        if p.resolve() not in [s.resolve() for s in seen]:
            seen.append(p)
    return seen


def describe(ref: dict[str, Any]) -> str:
    if ref.get("kind") == "hub":
        return f"hub model {ref['id']}@{ref.get('revision') or 'main'}"
    return f"base model {ref['name']!r} (weights sha256 {ref['sha256']})"


def resolve(ref: dict[str, Any], given: str | Path | None = None, cache: str | Path | None = None) -> str:
    """The base of ``ref`` on this host: a directory whose weights match, or the hub id.

    Raises ``BaseModelError`` naming what was expected and every place looked at.
    """
    if ref.get("kind") == "hub":
        return str(given) if given else ref["id"]
    looked = []
    for cand in candidates(ref, given, cache):
        if not contract.is_model_dir(cand):
            looked.append(f"{cand} (not there)")
            continue
        try:
            found = weights_sha256(cand)
        except BaseModelError:
            looked.append(f"{cand} (no weight files)")
            continue
        if found == ref["sha256"]:
            return str(cand.resolve())
        looked.append(f"{cand} (found weights sha256 {found})")
    fix = (
        f"pass --base-model-path DIR (or {BASE_PATH_ENV}) naming a directory that holds those weights"
        if given
        else f"copy that model into ${MODELS_ENV}/{ref['name']} "
        f"({MODELS_ENV}={cache or os.environ.get(MODELS_ENV) or 'unset'}) "
        f"or name its directory with --base-model-path (loraflow CLI) or {BASE_PATH_ENV} (mlflow.pyfunc)"
    )
    raise BaseModelError(f"{describe(ref)} expected, not found: looked at {'; '.join(looked) or 'nowhere'}; {fix}")


def read_reference(model_dir: Path) -> dict[str, Any] | None:
    """The reference stored in an MLflow model directory's MLmodel metadata (None for older versions)."""
    import yaml  # MLflow's own dependency: present wherever an MLflow model is loaded

    mlmodel = Path(model_dir) / "MLmodel"
    if not mlmodel.is_file():
        return None
    return ((yaml.safe_load(mlmodel.read_text()) or {}).get("metadata") or {}).get(REF_KEY)


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None):
    """MLflow's pyfunc loader for a loraflow version: the transformers flavour's, with the base resolved here.

    ``$LORAFLOW_BASE_MODEL_PATH`` names the base directory explicitly; otherwise it is
    looked up in ``$LORAFLOW_MODELS`` and verified against the recorded weights hash.
    """
    import mlflow.transformers as mt
    from mlflow.utils.model_utils import _get_flavor_configuration

    local = Path(path)
    ref = read_reference(local)
    if not ref or ref.get("kind") == "hub":
        return mt._load_pyfunc(path, model_config)
    base = resolve(ref, os.environ.get(BASE_PATH_ENV) or None)
    flavor = _get_flavor_configuration(local, mt.FLAVOR_NAME)
    model_config = mt._get_model_config(local.joinpath(mt._COMPONENTS_BINARY_DIR_NAME), model_config)
    return mt._TransformersWrapper(
        mt._load_model(str(local), flavor, "pipeline", base_model_path=base),
        flavor,
        model_config,
        mt._get_prompt_template(local),
    )
