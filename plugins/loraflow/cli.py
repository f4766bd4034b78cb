"""The ``loraflow`` command: look up, pull, try out and promote the models the pipeline registered.

    loraflow models list [--name NAME]
    loraflow models show NAME@ALIAS | NAME/VERSION | NAME
    loraflow models pull REF --dest DIR
    loraflow models generate REF --prompt TEXT [--base-model-path DIR] [--max-new-tokens N]
    loraflow models promote NAME VERSION --alias champion --reason "why"
    loraflow models rollback NAME --reason "why" [--alias champion]
    loraflow models history NAME
    loraflow models serve REF [--host 127.0.0.1] [--port 8000] [--base-model-path DIR]
    loraflow models export REF --format merged|peft|vllm --out DIR [--register]
    loraflow params

Tables for people, ``--json`` for scripts. Exit status: 0 ok, 1 a loraflow error (cause and
fix on stderr), 2 bad usage, 3 the MLflow server cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from loraflow import config
from loraflow.errors import LoraflowError, RegistryUnavailable

EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
SHOWN_METRICS = ("eval_loss", "perplexity", "final_train_loss", "epsilon")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from loraflow import registry

    registry.http_defaults(interactive=True)
    try:
        result = args.run(args)
    except RegistryUnavailable as exc:
        print(f"loraflow: error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except LoraflowError as exc:
        print(f"loraflow: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(args.render(result))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraflow", description="Use the models loraflow registered in MLflow.")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking server (default: $MLFLOW_TRACKING_URI or http://127.0.0.1:5000)",
    )
    groups = p.add_subparsers(dest="group", required=True)
    about = "the trigger form's params: section, name, default and what each sets (the job spec's descriptions)"
    form = groups.add_parser("params", help=about, description=about)
    form.add_argument("--json", action="store_true", help="print JSON instead of text")
    form.set_defaults(run=_params, render=_render_params)
    models = groups.add_parser("models", help="registered models and versions").add_subparsers(
        dest="command", required=True
    )

    def cmd(name: str, help: str, run, render):
        sub = models.add_parser(name, help=help, description=help)
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
        sub.add_argument("--tracking-uri", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sub.set_defaults(run=run, render=render)
        return sub

    s = cmd("list", "registered models and their versions, with aliases, metrics and lineage", _list, _render_list)
    s.add_argument("--name", help="only this registered model")
    s = cmd("show", "one version: NAME@ALIAS, NAME/VERSION, or NAME for the newest", _show, _render_show)
    s.add_argument("ref")
    s = cmd(
        "pull",
        "download a version's model (adapter + base reference), schema, metrics and metadata",
        _pull,
        _render_pull,
    )
    s.add_argument("ref")
    s.add_argument("--dest", required=True, help="an empty or new directory")
    s = cmd("generate", "load base model + adapter and complete a prompt (GPU if present)", _generate, _render_generate)
    s.add_argument("ref")
    s.add_argument("--prompt", required=True)
    s.add_argument("--base-model-path", help="the base model on this machine, if not where it was trained")
    s.add_argument("--max-new-tokens", type=int, default=32)
    s.add_argument("--raw", action="store_true", help="send the prompt as is, without the tokenizer's chat template")
    s = cmd("promote", "point an alias (e.g. champion) at a version and record why", _promote, _render_promote)
    s.add_argument("name")
    s.add_argument("version")
    s.add_argument("--alias", default="champion")
    s.add_argument(
        "--reason", required=True, help="why this version; stored as the version tag loraflow.promotion_reason"
    )
    s = cmd(
        "serve",
        "serve a version over HTTP (OpenAI-compatible /v1/completions and /v1/chat/completions); "
        "SIGHUP or POST /admin/reload follows its alias to a new version",
        _serve,
        _render_serve,
    )
    s.add_argument("ref")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--base-model-path", help="the base model on this machine, if not in $LORAFLOW_MODELS")
    s.add_argument("--max-tokens-limit", type=int, default=2048, help="refuse requests asking for more new tokens")
    s = cmd(
        "export",
        "write a version for other servers: merged weights, the PEFT adapter, or the adapter + a vLLM command",
        _export,
        _render_export,
    )
    s.add_argument("ref")
    s.add_argument("--format", required=True, choices=("merged", "peft", "vllm"))
    s.add_argument("--out", required=True, help="an empty or new directory")
    s.add_argument("--base-model-path", help="the base model on this machine, if not in $LORAFLOW_MODELS")
    s.add_argument(
        "--register", action="store_true", help="merged only: register the merged model as a version of NAME-merged"
    )
    s.add_argument("--register-name", help="the registered model for --register (default NAME-merged)")
    s = cmd(
        "rollback",
        "move champion back to the version that held it before the current one, and record why",
        _rollback,
        _render_rollback,
    )
    s.add_argument("name")
    s.add_argument("--alias", default="champion")
    s.add_argument(
        "--reason", required=True, help="why the current version is withdrawn; recorded in the alias history"
    )
    s = cmd(
        "history",
        "every recorded alias move of a model: when, which alias, from and to which version, by whom, why",
        _history,
        _render_history,
    )
    s.add_argument("name")
    return p


def _uri(args) -> str:
    return args.tracking_uri or config.tracking_uri()


# -- commands ------------------------------------------------------------------------------


def _list(args) -> Any:
    from loraflow import registry

    return registry.list_models(_uri(args), args.name)


def _show(args) -> Any:
    from loraflow import registry

    return registry.show(_uri(args), args.ref)


def _pull(args) -> Any:
    from pathlib import Path

    from loraflow import registry

    return registry.pull(_uri(args), args.ref, Path(args.dest))


def _generate(args) -> Any:
    from loraflow import generation

    if args.max_new_tokens < 1:
        raise LoraflowError("--max-new-tokens must be at least 1")
    return generation.generate(
        _uri(args),
        args.ref,
        args.prompt,
        base_model_path=args.base_model_path,
        max_new_tokens=args.max_new_tokens,
        raw=args.raw,
    )


def _serve(args) -> Any:
    from loraflow import serve

    if not 0 < args.port < 65536:
        raise LoraflowError(f"--port {args.port} is not a TCP port (1-65535)")
    if args.max_tokens_limit < 1:
        raise LoraflowError("--max-tokens-limit must be at least 1")
    return serve.serve(
        _uri(args),
        args.ref,
        host=args.host,
        port=args.port,
        base_model_path=args.base_model_path,
        max_tokens_limit=args.max_tokens_limit,
    )


def _export(args) -> Any:
    from pathlib import Path

    from loraflow import export

    return export.export(
        _uri(args),
        args.ref,
        args.format,
        Path(args.out),
        base_model_path=args.base_model_path,
        register=args.register,
        register_name=args.register_name,
    )


def _promote(args) -> Any:
    from loraflow import registry

    return registry.promote(_uri(args), args.name, args.version, args.alias, args.reason)


def _rollback(args) -> Any:
    from loraflow import registry

    return registry.rollback(_uri(args), args.name, args.reason, alias=args.alias)


def _history(args) -> Any:
    from loraflow import registry

    return registry.history(_uri(args), args.name)


# -- rendering -----------------------------------------------------------------------------


def _params(args) -> Any:
    from loraflow import params, schedule

    return params.reference(params.build_params(schedule.param_defaults()))  # the defaults the DAG's form shows


def _render_params(rows: list[dict]) -> str:
    out, section = [], None
    for row in rows:
        if row["section"] != section:
            section = row["section"]
            out.append(f"\n{section}" if out else section)
        out.append(f"  {row['name']} = {json.dumps(row['default'])}  ({row['title']})\n      {row['description']}")
    return "\n".join(out)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _metrics_cell(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={_fmt(metrics[k])}" for k in SHOWN_METRICS if k in metrics) or "-"


def _render_list(models: list[dict]) -> str:
    if not models:
        return "no registered models yet; run the loraflow_finetune DAG to register one"
    rows = []
    for m in models:
        for v in m["versions"]:
            lin = v["lineage"]
            rows.append(
                [
                    m["name"],
                    v["version"],
                    ",".join(v["aliases"]) or "-",
                    _metrics_cell(v["metrics"]),
                    f"{lin['dag_id']}/{lin['run_id']}" if lin["dag_id"] else "-",
                    lin["data_fingerprint"][:12] or "-",
                    _short_path(lin["base_model"]),
                    v["created"] or "-",
                ]
            )
        if not m["versions"]:
            rows.append([m["name"], "-", "-", "-", "-", "-", "-", "-"])
    return table(rows, ["MODEL", "VERSION", "ALIASES", "METRICS", "DAG RUN", "FINGERPRINT", "BASE MODEL", "CREATED"])


def _short_path(path: str) -> str:
    return (path if len(path) <= 40 else "…" + path[-39:]) or "-"


def _render_show(v: dict) -> str:
    from loraflow import cost

    lin = v["lineage"]
    lines = [
        f"{v['name']} version {v['version']}" + (f"  ({', '.join(v['aliases'])})" if v["aliases"] else ""),
        f"  created:          {v['created']}",
        f"  dag run:          {lin['dag_id']}/{lin['run_id']}" if lin["dag_id"] else "  dag run:          -",
        f"  data fingerprint: {lin['data_fingerprint'] or '-'}",
        f"  base model:       {lin['base_model'] or '-'}",
        f"  spec hash:        {lin['spec_hash'] or '-'}",
        f"  runtime / image:  {lin['runtime'] or '-'} {lin['image'] or ''} {lin['image_digest'] or ''}".rstrip(),
        f"  devices / cost:   {cost.summary(v.get('tags') or {})}",
        f"  promotion reason: {v['promotion_reason'] or '-'}",
        f"  mlflow run:       {v['run_url'] or '-'}",
        f"  source:           {v['source']}",
    ]
    if v["metrics"]:
        lines.append("  metrics:")
        lines += [f"    {k:<28} {_fmt(val)}" for k, val in v["metrics"].items()]
    return "\n".join(lines)


def _render_pull(v: dict) -> str:
    return "\n".join(
        [
            f"pulled {v['name']} version {v['version']} to {v['dest']}",
            *(f"  {p}" for p in v["pulled"]),
            f"  adapter:    {v['adapter_dir'] or '-'}",
            f"  base model: {v['base_model_path'] or '-'} (override with --base-model-path when loading elsewhere)",
        ]
    )


def _render_generate(r: dict) -> str:
    return f"{r['name']}/{r['version']} on {r['device']}:\n{r['completion']}"


def _render_serve(r: dict) -> str:
    return f"stopped serving {r['ref']} (version {r['version'] or '-'})"


def _render_export(r: dict) -> str:
    lines = [
        f"exported {r['name']} version {r['version']} ({r['format']}) to {r['out']}",
        f"  base model: {r['base']}",
        f"  lineage:    {r['lineage']}",
    ]
    if r.get("vllm_command"):
        lines.append(f"  run:        {r['vllm_command']}")
    if r.get("registered"):
        lines.append(f"  registered: {r['registered']['name']} version {r['registered']['version']}")
    if r.get("caveat"):
        lines.append(f"  caveat:     {r['caveat']}")
    return "\n".join(lines)


def _render_promote(v: dict) -> str:
    moved = f" (was version {v['previous_version']})" if v["previous_version"] else ""
    return f"{v['alias']} -> {v['name']} version {v['version']}{moved}; reason recorded: {v['promotion_reason']}"


def _render_rollback(r: dict) -> str:
    return f"{r['alias']} of {r['name']}: version {r['from']} -> {r['to']} (rolled back by {r['by']}: {r['reason']})"


def _render_history(h: dict) -> str:
    now = ", ".join(f"{a}=v{v}" for a, v in sorted(h["aliases"].items())) or "no aliases"
    if not h["moves"]:
        return f"{h['name']}: {now}; no alias moves recorded"
    rows = [
        [
            m.get("at", "")[:19].replace("T", " "),
            m.get("alias", ""),
            f"v{m['from']}" if m.get("from") else "-",
            f"v{m.get('to')}",
            m.get("kind", ""),
            m.get("by", ""),
            m.get("reason", ""),
        ]
        for m in h["moves"]
    ]
    return f"{h['name']}: {now}\n" + table(rows, ["WHEN (UTC)", "ALIAS", "FROM", "TO", "KIND", "BY", "REASON"])


if __name__ == "__main__":
    sys.exit(main())
