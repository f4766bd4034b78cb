"""``python -m loraflow_trainer.evaluate``: score adapters on the same exam, in one process.

The pipeline's ``evaluate`` task runs this in the trainer image after ``train``. It loads
the base model once, attaches this run's adapter (``challenger``) and, when the Airflow
side fetched one, the current champion's adapter, and scores each of them (and the bare
base, if asked) on this run's held-out set with the same settings:

- the loss of every eval example (mean over its label tokens), so a gate can pair them;
- generation metrics on the eval prompts against their references: exact match, and
  ROUGE-1 (unigram F1, what QA papers call token F1) and ROUGE-L F-measures from
  ``rouge-score``;
- a behaviour suite (``loraflow_trainer.behaviour``): each case's pass/fail per model.

What to score comes from a request file the Airflow side writes into the workspace
(``evaluate_request.json``; paths relative to job.json, since the container has no MLflow
access): ``adapters`` (name -> adapter dir), ``champion`` (what the Airflow side found:
status ``compared`` / ``none`` / ``not_comparable``, version, reason), ``include_base``,
``behaviour_suite``, ``max_generation_examples``, ``output``. The result is ``eval.json``
in the run's output directory, written atomically. Exit codes are the trainer's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from loraflow_trainer import contract, errors, spec

REQUEST = contract.EVAL_REQUEST_FILE
BASE = "base"  # the name the bare base model is reported under
DEFAULT_OUTPUT = f"{contract.OUTPUT_DIR}/{contract.EVAL_RESULT_FILE}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loraflow_trainer.evaluate",
        description="Score this run's adapter, the champion's and optionally the bare base on the run's eval set.",
        epilog="exit codes: " + "; ".join(f"{code} = {text}" for code, text in errors.EXIT_MEANINGS.items()),
    )
    p.add_argument(
        "--job", type=Path, required=True, help="path of job.json (relative paths resolve against its directory)"
    )
    p.add_argument("--request", type=Path, help=f"what to score (default: {REQUEST} beside job.json)")
    p.add_argument("--champion", type=Path, help="the champion's adapter directory (overrides the request)")
    p.add_argument("--base", action="store_true", help="also score the base model with no adapter")
    p.add_argument("--suite", type=Path, help="behaviour suite JSONL (overrides the request)")
    p.add_argument("--out", type=Path, help=f"where to write eval.json (default: {DEFAULT_OUTPUT} beside job.json)")
    return p


def load_request(args, job_dir: Path) -> dict[str, Any]:
    path = args.request or job_dir / REQUEST
    req: dict[str, Any] = {}
    if args.request is not None or path.exists():
        try:
            req = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise errors.JobSpecError(
                f"evaluate request {path} is unreadable ({exc}); re-run the evaluate task"
            ) from None
    adapters = dict(req.get("adapters") or {"challenger": "output/adapter"})
    champion = dict(req.get("champion") or {"status": "none"})
    if args.champion is not None:
        adapters["champion"] = str(args.champion)
        champion = {"status": "compared", "version": champion.get("version"), "reason": "given on the command line"}
    req.update(
        adapters=adapters,
        champion=champion,
        include_base=bool(args.base or req.get("include_base")),
        behaviour_suite=str(args.suite) if args.suite else req.get("behaviour_suite"),
        output=str(args.out) if args.out else req.get("output", DEFAULT_OUTPUT),
        max_generation_examples=int(req.get("max_generation_examples", 64)),
    )
    for name, rel in adapters.items():
        d = _resolve(rel, job_dir)
        if not (d / "adapter_config.json").exists():
            raise errors.ModelNotFoundError(
                f"the {name} adapter {d} has no adapter_config.json; "
                "re-run train (or, for the champion, the evaluate task)"
            )
    return req


def _resolve(path: str, base: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (base / p).resolve()


def run(job_path: Path, req: dict[str, Any]) -> dict[str, Any]:
    """Score every model of the request; return (and write) eval.json's content."""
    job = spec.load(job_path)
    job_dir = job_path.resolve().parent
    if not job.data.eval_path:
        raise errors.DataError(
            "this run has no eval set, so there is nothing to compare on; "
            "set eval_fraction above 0 or give eval_dataset_path"
        )
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    _require_metric_libraries()
    from loraflow_trainer import behaviour
    from loraflow_trainer import data as data_mod

    eval_path = job.resolve(job.data.eval_path, job_dir)
    rows = data_mod.read_rows(job, eval_path)  # fails on bad data before the model loads
    suite = behaviour.load_suite(_resolve(req["behaviour_suite"], job_dir)) if req.get("behaviour_suite") else []
    started = time.perf_counter()

    from peft import PeftModel

    from loraflow_trainer import launch
    from loraflow_trainer import model as model_stage
    from loraflow_trainer.metrics import perplexity
    from loraflow_trainer.samples import generate

    place = launch.placement(job)  # the same dtype, quantization and device as train
    model_kwargs = model_stage.from_pretrained_kwargs(job, job_dir, place)
    base, tok = model_stage.load(job, job_dir, model_kwargs, place)
    base.config.use_cache = True
    adapters = req["adapters"]
    names = list(adapters)
    model = PeftModel.from_pretrained(
        base, str(_resolve(adapters[names[0]], job_dir)), adapter_name=names[0], is_trainable=False
    )
    for name in names[1:]:
        model.load_adapter(str(_resolve(adapters[name], job_dir)), adapter_name=name, is_trainable=False)
    model.eval()
    load_s = time.perf_counter() - started

    examples = data_mod.load_examples(job, eval_path, tok)
    prompts, references = _generation_set(job, rows, tok, req["max_generation_examples"])
    suite_prompts = [_render_user_prompt(job, c.prompt, tok) for c in suite]
    max_new = int(req.get("max_new_tokens") or job.evaluation.sample_max_new_tokens)
    batch = job.evaluation.per_device_eval_batch_size
    limit = job.training.max_seq_length
    scored = names + ([BASE] if req.get("include_base") else [])
    results: dict[str, Any] = {}
    for name in scored:
        t0 = time.perf_counter()
        with _active(model, name):
            losses, tokens = per_example_loss(model, examples, tok.pad_token_id, batch)
            t_loss = time.perf_counter() - t0
            outputs = generate(model, tok, job, prompts, max_new, batch, max_prompt_tokens=limit)
            suite_out = generate(model, tok, job, suite_prompts, max_new, batch, max_prompt_tokens=limit)
        total_tokens = sum(tokens)
        mean_token_loss = sum(loss * n for loss, n in zip(losses, tokens, strict=True)) / total_tokens
        results[name] = {
            "adapter": adapters.get(name),
            "losses": losses,
            "eval_loss": mean_token_loss,
            "mean_example_loss": sum(losses) / len(losses),
            "perplexity": perplexity(mean_token_loss),
            "generation": generation_metrics(outputs, references),
            "behaviour": [
                {"id": c.id, "passed": not (f := c.check(o)), "failures": f, "output": o[:500]}
                for c, o in zip(suite, suite_out, strict=True)
            ],
            "samples": [
                {"prompt": p[-300:], "reference": r[:300], "output": o[:300]}
                for p, r, o in list(zip(prompts, references, outputs, strict=True))[:3]
            ],
            "loss_seconds": t_loss,
            "seconds": time.perf_counter() - t0,
        }
        print(
            json.dumps(
                {
                    "event": "evaluated",
                    "model": name,
                    "eval_loss": mean_token_loss,
                    "behaviour_passed": sum(b["passed"] for b in results[name]["behaviour"]),
                    "cases": len(suite),
                }
            ),
            flush=True,
        )
    result = {
        "eval_path": job.data.eval_path,
        "n_examples": len(examples),
        "example_tokens": tokens,
        "n_generation_examples": len(prompts),
        "n_behaviour_cases": len(suite),
        "settings": {
            "max_seq_length": job.training.max_seq_length,
            "max_new_tokens": max_new,
            "batch_size": batch,
            "decoding": "greedy",
            "device": place.device,
            "dtype": str(model_kwargs["dtype"]).removeprefix("torch."),
            "quantization": job.model.quantization,
        },
        "champion": req["champion"],
        "models": results,
        "load_seconds": load_s,
        "runtime_s": time.perf_counter() - started,
    }
    out = _resolve(req["output"], job_dir)
    contract.atomic_write_json(out, result)
    print(json.dumps({"event": "eval_saved", "path": str(out), "runtime_s": result["runtime_s"]}), flush=True)
    return result


class _active:
    """Run the block with adapter ``name`` active, or with every adapter off for the base."""

    def __init__(self, model, name: str):
        self.model, self.name, self._ctx = model, name, None

    def __enter__(self):
        if self.name == BASE:
            self._ctx = self.model.disable_adapter()
            self._ctx.__enter__()
        else:
            self.model.set_adapter(self.name)
        return self.model

    def __exit__(self, *exc):
        if self._ctx is not None:
            return self._ctx.__exit__(*exc)
        return False


def per_example_loss(
    model, examples: list[dict[str, list[int]]], pad_id: int, batch: int
) -> tuple[list[float], list[int]]:
    """Each example's mean cross-entropy over its label tokens, and how many label tokens it has."""
    import torch
    import torch.nn.functional as F

    from loraflow_trainer.data import IGNORE_INDEX, PaddingCollator

    collate = PaddingCollator(pad_id)
    losses: list[float] = []
    counts: list[int] = []
    with torch.inference_mode():
        for i in range(0, len(examples), batch):
            b = collate(examples[i : i + batch])
            logits = model(
                input_ids=b["input_ids"].to(model.device),
                attention_mask=b["attention_mask"].to(model.device),
                use_cache=False,
            ).logits.float()
            labels = b["labels"].to(logits.device)[:, 1:]
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
            keep = labels != IGNORE_INDEX
            n = keep.sum(dim=1)
            per = (nll * keep).sum(dim=1) / n.clamp(min=1)
            losses.extend(per.tolist())
            counts.extend(n.tolist())
    return losses, counts


def _render_user_prompt(job, prompt: str, tok) -> str:
    if job.data.data_format == "chat":
        return tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def _generation_set(job, rows: list, tok, limit: int) -> tuple[list[str], list[str]]:
    """(prompt as the model sees it, reference answer) for the first ``limit`` eval rows; none for plain text."""
    fmt = job.data.data_format
    prompts: list[str] = []
    refs: list[str] = []
    for row in rows[:limit]:
        if fmt == "prompt_completion":
            prompts.append(row[0])
            refs.append(row[1])
        elif fmt == "chat":
            upto = next(j for j, m in enumerate(row) if m["role"] == "assistant")
            prompts.append(tok.apply_chat_template(row[:upto], tokenize=False, add_generation_prompt=True))
            refs.append(row[upto]["content"])
    return prompts, refs


def generation_metrics(outputs: list[str], references: list[str]) -> dict[str, float]:
    """Exact match (whitespace- and case-normalised), ROUGE-1 and ROUGE-L F-measures (rouge-score)."""
    if not references:
        return {}
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    em = r1 = rl = 0.0
    for out, ref in zip(outputs, references, strict=True):
        em += float(" ".join(out.lower().split()) == " ".join(ref.lower().split()))
        s = scorer.score(ref, out)
        r1 += s["rouge1"].fmeasure
        rl += s["rougeL"].fmeasure
    n = len(references)
    return {"exact_match": em / n, "rouge1_f": r1 / n, "rougeL_f": rl / n}


def _require_metric_libraries() -> None:
    """Fail before the model loads when the image predates evaluate's dependencies."""
    import importlib.util

    missing = [
        pkg
        for mod, pkg in (("rouge_score", "rouge-score"), ("jsonschema", "jsonschema"))
        if importlib.util.find_spec(mod) is None
    ]
    if missing:
        raise errors.LoraflowTrainerError(
            f"{', '.join(missing)} not installed in the trainer environment; rebuild the trainer image "
            f"(scripts/build-trainer-image.sh) or pip install 'loraflow-trainer[train]'"
        )


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        job_dir = args.job.resolve().parent
        req = load_request(args, job_dir)
        run(args.job, req)
        return errors.EXIT_OK
    except errors.LoraflowTrainerError as exc:
        print(f"loraflow-evaluate: error: {exc}", file=sys.stderr, flush=True)
        print(json.dumps({"event": "failed", "exit_code": exc.exit_code, "error": str(exc)}), flush=True)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print(f"loraflow-evaluate: interrupted ({exc})", file=sys.stderr, flush=True)
        return errors.EXIT_INTERRUPTED
    except Exception as exc:
        import traceback

        from loraflow_trainer.cli import classify

        traceback.print_exc()
        failure = classify(exc)
        print(f"loraflow-evaluate: error: {failure}", file=sys.stderr, flush=True)
        return failure.exit_code


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown of torch (seconds), as loraflow-train does
