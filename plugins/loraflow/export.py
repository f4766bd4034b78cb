"""``loraflow models export NAME@ALIAS --format merged|peft|vllm --out DIR``: a version for other servers.

- ``peft``: the adapter directory alone (``adapter_config.json`` + ``adapter_model.safetensors``
  + the tokenizer), which vLLM ``--lora-modules``, TGI ``LORA_ADAPTERS`` and
  ``PeftModel.from_pretrained`` load. Its ``base_model_name_or_path`` is rewritten to the
  base as resolved on this host (the training path is kept in ``lineage.json``).
- ``vllm``: that adapter under ``adapter/`` plus ``run.sh`` and ``README.md`` with the
  ``vllm serve BASE --enable-lora --lora-modules NAME=adapter`` line.
- ``merged``: the adapter folded into the base weights (peft's ``merge_and_unload``),
  saved as a standard HF model directory in the base's dtype; it loads with plain
  ``AutoModelForCausalLM.from_pretrained``. ``register=True`` also registers it as a
  version of ``<NAME>-merged`` linked to the adapter version by tags.

Every export writes ``lineage.json``: the source version, its MLflow run, the base reference
and weights hash it was resolved and verified against, and the sha256 of every exported file.
Only ``merged`` imports torch (inside ``_merge``, run by the export command).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loraflow import generation, registry
from loraflow.errors import LoraflowError

FORMATS = ("merged", "peft", "vllm")
LINEAGE_FILE = "lineage.json"
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted --max-lora-rank values
KBIT_CAVEAT = (
    "this adapter was trained against a {q} quantized base; it is merged here into the full-precision "
    "base weights, so the merged model's outputs differ slightly from the quantized model's it was trained "
    "and evaluated with; evaluate the merged model before serving it, or serve the adapter on the quantized "
    "base (--format peft)"
)


def export(
    uri: str,
    ref: str,
    fmt: str,
    out: Path,
    *,
    base_model_path: str | None = None,
    register: bool = False,
    register_name: str | None = None,
) -> dict[str, Any]:
    if fmt not in FORMATS:
        raise LoraflowError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if register and fmt != "merged":
        raise LoraflowError("--register registers a merged model; use it with --format merged")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise LoraflowError(f"{out} is not empty; pass an empty or new --out directory")
    if fmt == "merged":
        generation.require_stack("export --format merged")
    info = registry.show(uri, ref)
    with tempfile.TemporaryDirectory(prefix="loraflow-export-") as tmp:
        model_dir = registry.download_model(uri, info, Path(tmp))
        base = registry.resolve_base(model_dir, info, base_model_path)
        adapter, tokenizer = model_dir / "peft", model_dir / "components" / "tokenizer"
        if not (adapter / "adapter_config.json").is_file():
            raise LoraflowError(
                f"{info['name']}/{info['version']} holds no PEFT adapter (model/peft/); "
                "it was not registered by loraflow"
            )
        source_files = _hashes(adapter)
        original_base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        params = registry.run_params(uri, info)
        base_ref = registry.read_reference(model_dir) or _reference_of(info)
        out.mkdir(parents=True, exist_ok=True)
        try:
            extra: dict[str, Any] = {}
            if fmt == "peft":
                _copy_adapter(adapter, tokenizer, out, base)
            elif fmt == "vllm":
                extra = _vllm(adapter, tokenizer, out, base, info)
            else:
                extra = {"dtype": _merge(adapter, tokenizer, base, out)}
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
    quantization = params.get("quantization", "none")
    lineage = {
        "format": fmt,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "loraflow_version": _loraflow_version(),
        "source": {
            "name": info["name"],
            "version": info["version"],
            "ref": ref,
            "aliases": info["aliases"],
            "mlflow_run_id": info["mlflow_run_id"],
            "run_url": info["run_url"],
            "lineage": info["lineage"],
            "adapter_files": source_files,
        },
        "base": {"reference": base_ref, "resolved": base, "trained_against": original_base},
        "quantization": quantization,
        "caveat": KBIT_CAVEAT.format(q=quantization) if fmt == "merged" and quantization != "none" else None,
        **extra,
        "files": _hashes(out),
    }
    (out / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2))
    result = {
        "name": info["name"],
        "version": info["version"],
        "format": fmt,
        "out": str(out.resolve()),
        "base": base,
        "lineage": str((out / LINEAGE_FILE).resolve()),
        "caveat": lineage["caveat"],
        **extra,
    }
    if register:
        result["registered"] = registry.register_export(
            uri, info, out, register_name or f"{info['name']}-merged", lineage
        )
    return result


def _reference_of(info: dict[str, Any]) -> dict[str, Any] | None:
    """The base reference from the version's tags (versions saved before the MLmodel held it)."""
    lin = info["lineage"]
    return {"name": lin.get("base_ref"), "sha256": lin.get("base_sha256")} if lin.get("base_ref") else None


def _loraflow_version() -> str:
    import loraflow

    return loraflow.__version__


def _hashes(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != LINEAGE_FILE:
            h = hashlib.sha256()
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[p.relative_to(root).as_posix()] = h.hexdigest()
    return out


def _copy_adapter(adapter: Path, tokenizer: Path, dest: Path, base: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for src in (adapter, tokenizer):
        if src.is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True)
    cfg_path = dest / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base  # where the base is on this host, so PeftModel/AutoPeftModel find it
    cfg_path.write_text(json.dumps(cfg, indent=2))


def _vllm(adapter: Path, tokenizer: Path, out: Path, base: str, info: dict[str, Any]) -> dict[str, Any]:
    _copy_adapter(adapter, tokenizer, out / "adapter", base)
    rank = int(json.loads((adapter / "adapter_config.json").read_text()).get("r", 16))
    max_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), rank)
    name = info["name"]
    adapter_dir = shlex.quote(str((out / "adapter").resolve()))
    command = (
        f"vllm serve {shlex.quote(base)} --enable-lora --lora-modules {shlex.quote(name)}={adapter_dir} "
        f"--max-lora-rank {max_rank}"
    )
    lora_flags = f'--enable-lora --lora-modules "{name}=$here/adapter" --max-lora-rank {max_rank}'
    (out / "run.sh").write_text(f"""#!/bin/sh
# Serve {name} version {info["version"]} with vLLM's multi-LoRA: the base model plus this adapter.
# BASE_MODEL overrides the base directory (it must hold the same weights: see lineage.json).
set -e
here=$(cd "$(dirname "$0")" && pwd)
exec vllm serve "${{BASE_MODEL:-{base}}}" {lora_flags} "$@"
""")
    (out / "run.sh").chmod(0o755)
    (out / "README.md").write_text(f"""# {name} version {info["version"]} for vLLM

The LoRA adapter is in `adapter/`; the base model it was trained on is `{base}` on the host that
exported it (its weights hash and the source version are in `lineage.json`).

```sh
{command}
# or: ./run.sh [more vllm serve flags]      (BASE_MODEL=/path/to/base ./run.sh on another host)
curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
  -d '{{"model": "{name}", "prompt": "Hello", "max_tokens": 32, "temperature": 0}}'
```

Requests name the adapter as the model (`"model": "{name}"`); the base stays servable under its own
name, and more adapters of the same base can be added with more `--lora-modules NAME=DIR` pairs.
`--max-lora-rank` must be at least the adapter's rank ({rank}). TGI loads the same directory with
`LORA_ADAPTERS={name}=<path to adapter>`.
""")
    return {"vllm_command": command, "lora_rank": rank}


def _merge(adapter: Path, tokenizer: Path, base: str, out: Path) -> str:
    from loraflow_trainer import inference  # torch, transformers, peft: the trainer package's world

    return inference.merge(adapter, tokenizer, base, out)
