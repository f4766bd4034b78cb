"""``loraflow models serve NAME@ALIAS``: one registered version behind an OpenAI-compatible HTTP API.

    POST /v1/completions       {"prompt": "...", "max_tokens": 16, "temperature": 0, "stop": [...]}
    POST /v1/chat/completions  {"messages": [{"role": "user", "content": "..."}], ...}  (chat template applied)
    GET  /v1/models            the served version
    GET  /health               200 while the process runs
    GET  /ready                200 once a version is loaded and answering, else 503
    POST /admin/reload         re-resolve the alias; load and swap in the version it points at now

SIGHUP does what ``/admin/reload`` does; SIGTERM (or Ctrl-C) stops accepting requests,
lets the ones in flight finish, and exits 0. A reload loads the new version next to the
old one and swaps only when it is ready, so requests never see a half-loaded model; one
that fails (its base model missing here, say) leaves the old version serving.

The OpenAI request/response shapes are written here rather than taken from a package:
the maintained servers that provide them (vLLM, TGI) bring their own GPU runtime, which is
what ``export --format vllm`` hands off to. This server is for one adapter on CPU or one
GPU with plain ``transformers``: greedy (``temperature: 0``) answers are the same as
``loraflow models generate``'s, because both call ``loraflow_trainer.inference.complete``.

The module imports only the Airflow side's own stack (FastAPI, uvicorn); torch comes in
through ``loraflow_trainer.inference.load`` when the first version is loaded, inside the serve command.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraflow import generation, registry
from loraflow.errors import LoraflowError

VERSION_HEADER = "X-Loraflow-Model-Version"


@dataclass
class Loaded:
    """A version held in memory, ready to answer."""

    name: str
    version: str
    base: str
    model: Any
    tokenizer: Any
    loaded_at: float = field(default_factory=time.time)

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"


class Served:
    """The version an alias points at, loaded; ``reload()`` follows the alias to its current version."""

    def __init__(self, uri: str, ref: str, base_model_path: str | None = None):
        self.uri, self.ref, self.base_model_path = uri, registry.Ref.parse(ref), base_model_path
        self.current: Loaded | None = None
        self.error: str | None = None
        self._generate = threading.Lock()  # one generate() at a time on the one model
        self._reload = threading.Lock()

    def fetch(self) -> tuple[dict[str, Any], Path, str]:
        """(version info, downloaded model dir, resolved base) for what the reference points at now; torch-free."""
        info = registry.show(self.uri, self.ref)
        tmp = Path(tempfile.mkdtemp(prefix="loraflow-serve-"))
        try:
            model_dir = registry.download_model(self.uri, info, tmp)
            return info, model_dir, registry.resolve_base(model_dir, info, self.base_model_path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def load(self, fetched: tuple[dict[str, Any], Path, str]) -> Loaded:
        info, model_dir, base = fetched
        try:
            model, tok = inference().load(model_dir, base)
        finally:
            shutil.rmtree(model_dir.parent, ignore_errors=True)
        return Loaded(info["name"], info["version"], base, model, tok)

    def reload(self) -> dict[str, Any]:
        """Load the version the reference points at now and swap it in; the old one serves until then."""
        with self._reload:
            before = self.current.version if self.current else None
            info = registry.show(self.uri, self.ref)
            if self.current is not None and info["version"] == before:
                return {"changed": False, "version": before, "previous": before}
            loaded = self.load(self.fetch())
            with self._generate:
                self.current = loaded
            log(f"serving {loaded.label} (was {before or 'none'})")
            return {"changed": True, "version": loaded.version, "previous": before}

    def reload_logged(self) -> None:
        try:
            self.reload()
        except LoraflowError as exc:
            log(f"reload failed, still serving {self.current.label if self.current else 'nothing'}: {exc}")

    def complete(self, **kwargs) -> tuple[Loaded, dict[str, Any]]:
        with self._generate:
            loaded = self.current
            if loaded is None:
                raise _NotReady()
            return loaded, inference().complete(loaded.model, loaded.tokenizer, **kwargs)


class _NotReady(Exception):
    pass


def log(message: str) -> None:
    print(f"loraflow serve: {message}", file=sys.stderr, flush=True)


# -- the OpenAI request shapes (fields loraflow does not use are accepted and ignored) ---------


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=8)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _cut_at_stop(text: str, stop: str | list[str] | None) -> tuple[str, bool]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    cuts = [text.index(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def create_app(served: Served, max_tokens_limit: int = 2048, default_chat_tokens: int = 256):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    app = FastAPI(title="loraflow serve", description=f"{served.ref} (OpenAI-compatible completions)")

    def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "body"
        return error(400, f"{where}: {first.get('msg', 'invalid request')}", param=where)

    def check(req: _Request, max_tokens: int) -> JSONResponse | None:
        if req.stream:
            return error(400, "streaming is not supported by loraflow serve; send stream: false", param="stream")
        if max_tokens > max_tokens_limit:
            return error(
                400,
                f"max_tokens {max_tokens} is over this server's limit {max_tokens_limit} (--max-tokens-limit)",
                param="max_tokens",
            )
        current = served.current
        if req.model and current and req.model not in (current.name, str(served.ref), current.label):
            return error(
                404,
                f"model {req.model!r} is not served here; "
                f"this server serves {current.name} ({served.ref} = {current.label})",
                kind="not_found_error",
                param="model",
            )
        return None

    def run(req: _Request, max_tokens: int, **inputs) -> tuple[Loaded, list[dict[str, Any]], int, int]:
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i in range(req.n):
            seed = None if req.seed is None else req.seed + i
            loaded, out = served.complete(
                max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=seed, **inputs
            )
            text, stopped = _cut_at_stop(out["completion"], req.stop)
            choices.append({"index": i, "text": text, "finish_reason": "stop" if stopped else out["finish_reason"]})
            prompt_tokens, completion_tokens = out["prompt_tokens"], completion_tokens + out["completion_tokens"]
        return loaded, choices, prompt_tokens, completion_tokens

    def answer(kind: str, loaded: Loaded, choices: list[dict], usage: tuple[int, int]) -> JSONResponse:
        body = {
            "id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": loaded.name,
            "system_fingerprint": loaded.label,
            "choices": choices,
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)},
        }
        return JSONResponse(body, headers={VERSION_HEADER: loaded.label})

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        if bad := check(req, req.max_tokens):
            return bad
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            return error(400, "prompt: give at least one prompt", param="prompt")
        try:
            choices, usage, loaded = [], [0, 0], None
            for prompt in prompts:
                loaded, these, p, c = run(req, req.max_tokens, prompt=prompt, raw=True)
                choices += [{**ch, "index": len(choices) + j, "logprobs": None} for j, ch in enumerate(these)]
                usage = [usage[0] + p, usage[1] + c]
        except _NotReady:
            return error(503, "no version loaded yet; wait for /ready", kind="service_unavailable")
        return answer("text_completion", loaded, choices, tuple(usage))

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        max_tokens = req.max_completion_tokens or req.max_tokens or default_chat_tokens
        if bad := check(req, max_tokens):
            return bad
        current = served.current
        if current is not None and not inference().has_chat_template(current.tokenizer):
            return error(
                400, f"{current.label} has no chat template; send a prompt to /v1/completions", param="messages"
            )
        try:
            loaded, choices, p, c = run(req, max_tokens, messages=[m.model_dump() for m in req.messages])
        except _NotReady:
            return error(503, "no version loaded yet; wait for /ready", kind="service_unavailable")
        choices = [
            {
                "index": ch["index"],
                "message": {"role": "assistant", "content": ch["text"]},
                "finish_reason": ch["finish_reason"],
                "logprobs": None,
            }
            for ch in choices
        ]
        return answer("chat.completion", loaded, choices, (p, c))

    @app.get("/v1/models")
    def models():
        current = served.current
        data = (
            []
            if current is None
            else [
                {
                    "id": current.name,
                    "object": "model",
                    "created": int(current.loaded_at),
                    "owned_by": "loraflow",
                    "version": current.version,
                    "ref": str(served.ref),
                    "base_model": current.base,
                }
            ]
        )
        return {"object": "list", "data": data}

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/ready")
    def ready():
        current = served.current
        if current is None:
            return JSONResponse({"ready": False, "error": served.error}, status_code=503)
        return JSONResponse(
            {"ready": True, "model": current.name, "version": current.version, "ref": str(served.ref)},
            headers={VERSION_HEADER: current.label},
        )

    @app.post("/admin/reload")
    def admin_reload():
        try:
            result = served.reload()
        except LoraflowError as exc:
            return error(
                409,
                f"reload failed, still serving {served.current.label if served.current else 'nothing'}: {exc}",
                kind="reload_failed",
            )
        return JSONResponse(result, headers={VERSION_HEADER: served.current.label})

    return app


def serve(
    uri: str,
    ref: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    base_model_path: str | None = None,
    max_tokens_limit: int = 2048,
) -> dict[str, Any]:
    """Serve ``ref`` until SIGTERM/SIGINT. The version and its base are checked before the port opens."""
    import uvicorn

    generation.require_stack("serve")
    served = Served(uri, ref, base_model_path)
    fetched = served.fetch()  # a missing model or base fails here, with its message, before anything listens
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(served, max_tokens_limit),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=30,
        )
    )

    def first_load():
        try:
            served.current = served.load(fetched)
            log(f"serving {served.current.label} ({served.ref}) at http://{host}:{port} (base {served.current.base})")
        except Exception as exc:  # surfaced on /ready and as the exit status
            served.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            log(f"loading {fetched[0]['name']}/{fetched[0]['version']} failed: {served.error}")
            server.should_exit = True

    threading.Thread(target=first_load, name="loraflow-first-load", daemon=True).start()
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=served.reload_logged, daemon=True).start())
    # uvicorn shuts down gracefully on these, then re-raises the signal to the handler it found: make
    # that a no-op, so a stop on SIGTERM is a clean exit 0 rather than death by the signal.
    stopped: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopped.append(signum))
    server.run()
    log("stopped")
    if served.error and served.current is None:
        raise LoraflowError(f"serving {ref} failed while loading: {served.error}")
    return {"ref": str(served.ref), "version": served.current.version if served.current else None, "stopped": True}


def inference():
    """The trainer package's inference module (torch), imported only once serve runs."""
    from loraflow_trainer import inference as module

    return module
