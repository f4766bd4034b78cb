"""Behaviour suites: a user's JSONL of prompts with checks, and the checks themselves.

One line is one case::

    {"id": "refuses-password", "prompt": "What is the admin password?",
     "must_contain": ["cannot"], "must_not_contain": ["hunter2"], "regex": "^[A-Z]",
     "json_schema": {"type": "object", "required": ["answer"]}, "max_length": 200}

``prompt`` (a user turn; chat models get it through their chat template) is required, with
at least one check. ``must_contain`` / ``must_not_contain`` take a string or a list of
strings (case-sensitive substrings), ``regex`` a Python regular expression searched in
the output, ``json_schema`` a JSON Schema the output must parse as JSON and validate
against, ``max_length`` the most characters the output may have.

Torch-free (the standard library and ``jsonschema``): the Airflow side validates a suite
here before any GPU time, the trainer's ``evaluate`` runs the checks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraflow_trainer.errors import DataError

CHECKS = ("must_contain", "must_not_contain", "regex", "json_schema", "max_length")
MAX_CASES = 1000
MAX_PROMPT_CHARS = 20_000


@dataclass(frozen=True)
class Case:
    id: str
    prompt: str
    must_contain: tuple[str, ...] = ()
    must_not_contain: tuple[str, ...] = ()
    regex: str | None = None
    json_schema: dict[str, Any] | None = None
    max_length: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self, output: str) -> list[str]:
        """The reasons ``output`` fails this case (empty: it passes)."""
        failures = [f"does not contain {s!r}" for s in self.must_contain if s not in output]
        failures += [f"contains {s!r}" for s in self.must_not_contain if s in output]
        if self.regex is not None and not re.search(self.regex, output):
            failures.append(f"does not match /{self.regex}/")
        if self.max_length is not None and len(output) > self.max_length:
            failures.append(f"is {len(output)} characters, over max_length {self.max_length}")
        if self.json_schema is not None:
            failures += _json_failures(output, self.json_schema)
        return failures


def _json_failures(output: str, schema: dict[str, Any]) -> list[str]:
    import jsonschema

    try:
        value = json.loads(output)
    except json.JSONDecodeError as exc:
        return [f"is not JSON ({exc.msg} at character {exc.pos})"]
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(value))
    return [f"does not match the JSON schema ({error.message[:200]})"] if error is not None else []


def _strings(value: Any, key: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(s, str) and s for s in value):
        raise DataError(f"{where}: {key} must be a non-empty string or a list of non-empty strings")
    return tuple(value)


def parse_case(row: Any, where: str, index: int) -> Case:
    """One suite line as a Case, or DataError naming the line and what to fix."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a case is a JSON object with a prompt and checks, not {type(row).__name__}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: prompt is missing or empty; give each case the user prompt to send")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise DataError(f"{where}: prompt is {len(prompt)} characters, over {MAX_PROMPT_CHARS}; shorten it")
    unknown = sorted(set(row) - {"id", "prompt", *CHECKS, "description", "tags"})
    if unknown:
        raise DataError(
            f"{where}: unknown key(s) {', '.join(unknown)}; a case has id, prompt and checks {', '.join(CHECKS)}"
        )
    if not any(k in row for k in CHECKS):
        raise DataError(f"{where}: no check; add at least one of {', '.join(CHECKS)}")
    kwargs: dict[str, Any] = {}
    for key in ("must_contain", "must_not_contain"):
        if key in row:
            kwargs[key] = _strings(row[key], key, where)
    if "regex" in row:
        if not isinstance(row["regex"], str):
            raise DataError(f"{where}: regex must be a string")
        try:
            re.compile(row["regex"])
        except re.error as exc:
            raise DataError(f"{where}: regex {row['regex']!r} does not compile ({exc}); fix the pattern") from None
        kwargs["regex"] = row["regex"]
    if "json_schema" in row:
        import jsonschema

        if not isinstance(row["json_schema"], dict):
            raise DataError(f"{where}: json_schema must be a JSON Schema object")
        try:
            jsonschema.Draft202012Validator.check_schema(row["json_schema"])
        except jsonschema.exceptions.SchemaError as exc:
            raise DataError(f"{where}: json_schema is not a valid JSON Schema ({exc.message[:200]})") from None
        kwargs["json_schema"] = row["json_schema"]
    if "max_length" in row:
        n = row["max_length"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise DataError(f"{where}: max_length must be a whole number of characters (0 or more)")
        kwargs["max_length"] = n
    case_id = row.get("id", f"case-{index + 1}")
    if not isinstance(case_id, str | int):
        raise DataError(f"{where}: id must be a string")
    return Case(id=str(case_id), prompt=prompt, **kwargs)


def load_suite(path: Path) -> list[Case]:
    """Every case of a suite file, checked; DataError names the line and the fix."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"behaviour suite {path} does not exist; point behaviour_suite_path at a JSONL file under a data root"
        )
    cases: list[Case] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"behaviour suite {path} is not UTF-8 (byte {exc.start}); save it as UTF-8 JSONL") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"behaviour suite {path.name} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not JSON ({exc.msg}); one JSON object per line") from None
        cases.append(parse_case(row, where, len(cases)))
        if len(cases) > MAX_CASES:
            raise DataError(
                f"behaviour suite {path.name} has more than {MAX_CASES} cases; "
                "split it or keep the ones that gate promotion"
            )
    if not cases:
        raise DataError(f"behaviour suite {path} has no cases; add one JSON object per line")
    ids = [c.id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise DataError(
            f"behaviour suite {path.name}: duplicate case id(s) {', '.join(dupes)}; give each case its own id"
        )
    return cases
