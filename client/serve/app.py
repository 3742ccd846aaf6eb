"""``fedretrain site serve``: the site's installed version behind an OpenAI-style completions API.

- ``POST /v1/completions`` ``{"prompt", "max_tokens"?, "temperature"?, "seed"?}``: the answer
  of the installed version, in OpenAI's ``text_completion`` shape; its ``model`` names the
  version (``fedretrain-v3``), and its ``id`` is what feedback names.
- ``GET /v1/models``: the installed version.
- ``POST /v1/feedback`` ``{"id", "rating": "good"|"bad"}`` or ``{"id", "correction": TEXT}``
  (client/serve/feedback.py), at most :data:`FEEDBACK_PER_MINUTE` from one client.
- ``GET /v1/scores``: per version, requests, latency, ratings and corrections (the site's own).

The model is loaded and verified at start (client/install/generate.py) and again when the
site installs another version (the store's state is looked at on each request), so it
answers with what the site installed, verified, and says which.

While a version is on trial at the site (a canary of a staged rollout, client/install/trial.py)
both versions are loaded and each request is answered per the trial's mode: ``shadow``, both
answer and the installed version's answer is served (the other is journalled beside it);
``ab``, the version on trial answers a share ``ab_share`` of requests, drawn at random. The
journal records which version served and which was on trial, so feedback scores both
(client/serve/canary.py). Errors are OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, with the field named. One request is
computed at a time (the model is shared), in a worker thread.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from client.install.generate import InstalledModel, complete, load_installed
from client.install.model_store import ModelStore
from client.install.trial import current_trial
from client.serve.feedback import AlreadyCorrected, give_feedback
from client.serve.journal import Journal, UnknownRequest, now_iso
from fedretrain.config import SiteConfig
from fedretrain.errors import ConfigError, DataValidationError, VerificationError
from fedretrain.web import loopback_host

MAX_TOKENS = 512
MAX_PROMPT = 20_000  # characters
FEEDBACK_PER_MINUTE = 30
JSON = "application/json"


class ServedModel:
    """The installed version, loaded once and again whenever the site's store points elsewhere."""

    def __init__(self, site: SiteConfig) -> None:
        if not site.coordinator_key:
            raise ConfigError(
                f"site {site.site_id}: coordinator-key is not set, so no installed version can be verified; "
                "the service answers only with a verified version"
            )
        self.site = site
        self.store = ModelStore(site.model_store_path)
        self.loading = threading.Lock()  # one (re)load at a time
        self.computing = threading.Lock()  # one generation at a time (the model is shared)
        self.installed: InstalledModel | None = None
        self.loaded: tuple[Any, ...] | None = None  # what ``installed`` was loaded for
        self.scored: tuple[tuple[Any, ...] | None, dict[str, float]] = (None, {})  # the review queue's losses
        # What failed its checks (installed version, trial, the student's manifest), and why.
        self.failed: tuple[tuple[Any, ...], str] | None = None

    def current(self) -> InstalledModel:
        """The model of the store's current version, with the version on trial if any
        (VerificationError: none installed, or it fails its checks). Blocking: call it from a
        worker thread. A version that failed is not tried again."""
        with self.loading:
            # A site of model-variant='student' serves the current version's student, never a trial.
            student = self.site.model_variant == "student"
            on_trial = None if student else current_trial(self.store)
            version = self.store.state().current
            # A student that arrives, or replaces a damaged copy, is loaded: its manifest is part of the key.
            wanted = (version, None if on_trial is None else on_trial[0], _student_mark(self.store, version, student))
            if self.installed is not None and self.loaded == wanted:
                return self.installed
            if self.failed is not None and self.failed[0] == wanted:
                raise VerificationError("store", self.failed[1])
            self.installed = None  # the old model goes before the new one loads
            try:
                self.installed = load_installed(
                    self.site.model_store_path,
                    coordinator_key=Path(str(self.site.coordinator_key)),
                    device=self.site.device,
                    with_trial=not student,
                    variant=self.site.model_variant,
                )
            except VerificationError as err:
                self.failed = (wanted, str(err))
                raise
            self.loaded = wanted
            return self.installed

    def losses(self, texts: list[str]) -> list[float]:
        """Each text's mean next-token loss under the version this service answers with (the review
        queue's order: least sure first); one computation at a time, like an answer."""
        from client.install.generate import INSTALLED_ADAPTER
        from fedretrain.data.encoding import encode_texts
        from fedretrain.training.evaluate import evaluate_loss

        installed = self.current()
        context = getattr(installed.model.config, "max_position_embeddings", None)
        length = min(context, 1024) if isinstance(context, int) else 1024
        with self.computing:
            # Each text is scored once per loaded model: a reviewer's every click reloads the queue.
            if self.scored[0] != self.loaded:
                self.scored = (self.loaded, {})
            known = self.scored[1]
            new = sorted({t for t in texts if t not in known})
            if new:
                if not installed.student:
                    installed.model.set_adapter(INSTALLED_ADAPTER)
                dataset = encode_texts(installed.tokenizer, new, length)
                known.update(
                    zip(new, evaluate_loss(installed.model, dataset, batch_size=16).example_losses, strict=True)
                )
            return [known[t] for t in texts]

    def answer(self, prompt: str, max_tokens: int, temperature: float, seed: int) -> dict[str, Any]:
        """The completion, the version that gave it, its tokens and seconds; one request at a time."""
        installed = self.current()
        context = getattr(installed.model.config, "max_position_embeddings", None)
        prompt_tokens = len(installed.tokenizer(prompt)["input_ids"])
        if isinstance(context, int) and prompt_tokens + max_tokens > context:
            raise ServiceError(
                400,
                f"prompt ({prompt_tokens} tokens) and max_tokens ({max_tokens}) exceed the model's context of "
                f"{context} tokens",
                param="prompt",
            )
        trial = installed.trial
        # Which version serves: the installed one, unless an A/B trial draws the other.
        served_by_trial = trial is not None and trial.mode == "ab" and secrets.randbelow(10**6) < trial.ab_share * 10**6
        with self.computing:
            started = time.perf_counter()
            out = complete(
                installed, prompt, max_new_tokens=max_tokens, temperature=temperature, seed=seed, trial=served_by_trial
            )
            seconds = time.perf_counter() - started
            shadow = None
            if trial is not None and trial.mode == "shadow":
                started = time.perf_counter()
                other = complete(
                    installed, prompt, max_new_tokens=max_tokens, temperature=temperature, seed=seed, trial=True
                )
                shadow = {
                    "version": other.version,
                    "completion": other.text[len(prompt) :],
                    "latency_s": round(time.perf_counter() - started, 4),
                }
        answer: dict[str, Any] = {
            "completion": out.text[len(prompt) :],
            "version": out.version,
            "completion_tokens": out.new_tokens,
            "prompt_tokens": prompt_tokens,
            "latency_s": round(seconds, 4),
        }
        if installed.student:
            answer["student"] = True  # the smaller model distilled from that version
        elif installed.fallback:
            answer["student"] = False
            answer["note"] = installed.fallback
        if trial is not None:
            answer["trial"] = {"version": trial.version, "mode": trial.mode, "installed": installed.version}
            if shadow is not None:
                answer["shadow"] = shadow
        return answer


def create_app(site: SiteConfig, journal: Journal, served: ServedModel) -> FastAPI:
    app = FastAPI(title=f"fedretrain site {site.site_id}", docs_url=None, redoc_url=None, openapi_url=None)
    recent: dict[str, deque[float]] = defaultdict(deque)  # client host -> times of its feedback

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        # A web page the site's operator opens must not reach the service: not by a name of its
        # own rebound to 127.0.0.1 (the Host is checked), nor by a "simple" cross-origin POST
        # (only application/json is taken, which a browser sends cross-origin only after a
        # preflight this service never answers).
        if not loopback_host(request.headers.get("host", "")):
            return _error(400, "the service answers only to 127.0.0.1, ::1 or localhost", param=None)
        if request.method == "POST" and request.headers.get("content-type", "").split(";")[0].strip() != JSON:
            return _error(415, f"send the body as {JSON}", param=None)
        return await call_next(request)

    @app.exception_handler(ServiceError)
    async def refused(request: Request, exc: ServiceError) -> JSONResponse:
        return _error(exc.status, exc.message, param=exc.param, kind=exc.kind, code=exc.code, headers=exc.headers)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        installed = _installed(served)
        model = {"id": f"fedretrain-v{installed.version}", "object": "model", "owned_by": site.site_id}
        return {"object": "list", "data": [model]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict[str, Any]:
        body = await _json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]  # OpenAI's clients may send a batch of one
        if not isinstance(prompt, str) or not prompt:
            raise ServiceError(400, "prompt must be a non-empty string", param="prompt")
        if len(prompt) > MAX_PROMPT:
            raise ServiceError(400, f"prompt longer than {MAX_PROMPT} characters", param="prompt")
        max_tokens = _number(body, "max_tokens", 16, int, 1, MAX_TOKENS)
        temperature = _number(body, "temperature", 0.0, float, 0.0, 2.0)
        seed = _number(body, "seed", 0, int, 0, 2**31 - 1)
        await run_in_threadpool(_installed, served)  # a clear error before any work, off the event loop
        answer = await run_in_threadpool(served.answer, prompt, max_tokens, temperature, seed)
        request_id = "cmpl-" + secrets.token_hex(12)
        journal.record_request({"id": request_id, "at": now_iso(), "prompt": prompt, **answer})
        tokens = answer["completion_tokens"]
        return {
            "id": request_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": f"fedretrain-v{answer['version']}",
            "choices": [
                {
                    "text": answer["completion"],
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": "length" if tokens >= max_tokens else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": answer["prompt_tokens"],
                "completion_tokens": tokens,
                "total_tokens": answer["prompt_tokens"] + tokens,
            },
        }

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> dict[str, Any]:
        client = request.client.host if request.client else "unknown"
        times, now = recent[client], time.monotonic()
        while times and now - times[0] > 60:
            times.popleft()
        if len(times) >= FEEDBACK_PER_MINUTE:
            wait = int(60 - (now - times[0])) + 1
            raise ServiceError(
                429,
                f"at most {FEEDBACK_PER_MINUTE} feedback a minute from one client; try again in {wait} s",
                kind="rate_limit_error",
                headers={"Retry-After": str(wait)},
            )
        body = await _json(request)
        request_id = body.get("id")
        if not isinstance(request_id, str) or not request_id:
            raise ServiceError(400, "id must name an answer (its 'id', cmpl-...)", param="id")
        rating, correction = body.get("rating"), body.get("correction")
        for name, value in (("rating", rating), ("correction", correction)):
            if value is not None and not isinstance(value, str):
                raise ServiceError(400, f"{name} must be a string", param=name)
        times.append(now)
        try:
            entry = await run_in_threadpool(
                give_feedback, site, journal, request_id, rating=rating, correction=correction
            )
        except UnknownRequest as err:
            raise ServiceError(404, str(err), param="id") from None
        except AlreadyCorrected as err:
            raise ServiceError(409, str(err), param="correction") from None
        except DataValidationError as err:
            raise ServiceError(400, f"correction refused: {err.reason}", param="correction") from None
        except ConfigError as err:
            raise ServiceError(400, str(err), param="rating" if rating is not None else None) from None
        return {"recorded": {k: v for k, v in entry.items() if k != "correction"}}

    @app.get("/v1/scores")
    def scores() -> dict[str, Any]:
        return {"site_id": site.site_id, "versions": journal.scores()}

    from client.serve.review import add_review_routes  # it imports this module

    add_review_routes(app, site, served)
    return app


class ServiceError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers


def _student_mark(store: ModelStore, version: int | None, student: bool) -> bytes | None:
    """The stored student's manifest bytes for a student site (None: none, or a full site)."""
    if not student or version is None:
        return None
    from client.install.student import student_dir

    path = student_dir(store, version) / "student.json"
    try:
        return path.read_bytes()
    except OSError:
        return None


def _installed(served: ServedModel) -> InstalledModel:
    try:
        return served.current()
    except VerificationError as err:
        raise ServiceError(503, f"no verified version to answer with: {err}", kind="server_error") from None
    except (OSError, ValueError, RuntimeError) as err:  # a damaged store or model files
        raise ServiceError(503, f"the installed version cannot be loaded: {err}", kind="server_error") from None


def _error(
    status: int,
    message: str,
    *,
    param: str | None,
    kind: str = "invalid_request_error",
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise ServiceError(400, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ServiceError(400, "the body must be a JSON object")
    return body


def _number(body: dict[str, Any], name: str, default: Any, kind: type, low: float, high: float) -> Any:
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not float(value).is_integer()):
        raise ServiceError(400, f"{name} must be {'a whole number' if kind is int else 'a number'}", param=name)
    if not low <= value <= high:
        raise ServiceError(400, f"{name} must be in [{low}, {high}], got {value}", param=name)
    return kind(value)
