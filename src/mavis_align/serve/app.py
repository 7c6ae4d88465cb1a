"""OpenAI-compatible HTTP API where every request carries its own objective weights.

    POST /v1/completions          {"prompt": "...", "objective_weights": {"harmless": 0.8, "helpful": 0.2},
    POST /v1/chat/completions      "beta": 5.0, "top_k": 15, "return_rewards": true, "stream": false, ...}
    GET  /v1/models, /v1/objectives, /health, /   (the playground page)

Extra body fields (OpenAI clients: ``extra_body``): ``objective_weights`` ({name: weight >= 0};
omitted = plain sampling from pi_ref), ``beta`` (>= 0), ``top_k`` (candidates, >= 1; default 15 with
objective weights, else the whole vocabulary), ``min_tokens`` (no EOS before), ``normalize`` (min-max
normalise the combined values, default true), ``max_step_kl`` (cap in nats on the KL the tilt adds per
step, 0 = none), ``tail`` (``"drop"``, the paper's tilt, or ``"keep"``: tokens outside the top-k keep
pi_ref's mass, tilted by a baseline value), ``tilt_tokens`` (tilt only the first that many tokens, 0 = every
token), ``candidate_p`` (the candidates: the fewest of the top-k holding that much of pi_ref's mass), ``return_rewards`` (score the result with the reward
functions of the same names). ``temperature`` 0 is greedy decoding. Responses
carry a ``mavis`` object with the KL estimate (eq. 7), the weights and beta used, and the rewards.
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import math
import queue
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generation import DEFAULT_TOP_K, TAILS, SamplingConfig
from .scheduler import GenRequest, MemoryBudget, OverBudget, Scheduler, ShuttingDown

PAGE = "playground.html"


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


SEED_RANGE = (-(2**63), 2**63 - 1)
MIN_TEMPERATURE = 1e-2  # below it (but above 0, which is greedy) softmax(logits / T) over/underflows
MAX_WEIGHT = 1e6


def create_app(decoder, *, model_name: str = "mavis", api_key: str | None = None, max_tokens_limit: int = 512,
               max_prompt_tokens: int = 2048, max_batch: int = 16, max_queue: int = 64, max_body_bytes: int = 1 << 20,
               rewards=None, scheduler_thread: bool = True, budget: MemoryBudget | None = None):
    """Build the FastAPI app around a :class:`~mavis_align.decoding.decoder.MavisDecoder`.

    Every field is checked before a request reaches the decode loop (4xx with OpenAI's error shape);
    at most ``max_queue`` requests wait (429 beyond), bodies over ``max_body_bytes`` get 413.
    ``budget`` bounds the memory of the live batch (default: :meth:`MemoryBudget.for_models`, never
    below one request of ``max_prompt_tokens + max_tokens_limit``); requests wait for room, and one
    that could never fit gets 400. While the scheduler drains (shutdown), new requests get 503.

    With ``scheduler_thread=False`` the decode loop does not start; call
    ``app.state.scheduler.run()`` from the thread that loaded the models (what :func:`serve` does).
    """
    tok = decoder.tokenizer
    objectives = decoder.objectives
    reward_fns = {r.name: r for r in (rewards or [])}
    if budget is None:
        budget = MemoryBudget.for_models(decoder.model, decoder.value_models, at_least=max_prompt_tokens + max_tokens_limit)
    scheduler = Scheduler(decoder.model, tok, decoder.value_models, decoder.bindings, max_batch=max_batch, max_queue=max_queue,
                          rewards=reward_fns, start_thread=scheduler_thread, budget=budget)
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        yield
        scheduler.shutdown()

    app = FastAPI(title="mavis-align", version="0.1.0", lifespan=lifespan)
    app.state.scheduler = scheduler

    def error(status: int, message: str, param=None, code=None, kind="invalid_request_error"):
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return error(exc.status, exc.message, exc.param, exc.code, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, exc: RequestValidationError):
        return error(400, f"invalid request: {exc.errors()[:3]}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), kind="not_found_error" if exc.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def _unexpected(_, exc: Exception):  # never a plain-text 500
        return error(500, f"internal error: {type(exc).__name__}", kind="server_error")

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {api_key}":
            raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key", kind="authentication_error")

    async def body_of(request: Request) -> dict:
        check_key(request)
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise APIError(413, f"request body is {len(raw)} bytes; this server accepts at most {max_body_bytes}", code="body_too_large")
        try:
            body = json.loads(raw or b"{}")
        except ValueError as err:  # invalid JSON or UTF-8, or an integer literal of over 4300 digits
            raise APIError(400, f"request body is not valid JSON: {str(err)[:200]}") from None
        except RecursionError:
            raise APIError(400, "request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        return body

    def short(val) -> str:
        text = repr(val)
        return text if len(text) <= 40 else text[:37] + "..."

    def number(body: dict, key: str, default, lo=None, hi=None, integer=False, where: str | None = None):
        """A finite number in [lo, hi] (ints compared exactly: huge literals never overflow)."""
        val = body.get(key, default)
        name = where or key
        if val is None:
            return default
        if isinstance(val, bool) or not isinstance(val, (int, float)) or (integer and isinstance(val, float) and not val.is_integer()):
            raise APIError(400, f"`{name}` must be {'an integer' if integer else 'a number'}, got {short(val)}", param=name)
        if (isinstance(val, float) and not math.isfinite(val)) or (lo is not None and val < lo) or (hi is not None and val > hi):
            raise APIError(400, f"`{name}` must be in [{lo}, {hi}], got {short(val)}", param=name)
        return int(val) if integer else float(val)

    def flag(body: dict, key: str, default: bool) -> bool:
        val = body.get(key, default)
        if val is None:
            return default
        if not isinstance(val, bool):
            raise APIError(400, f"`{key}` must be true or false, got {short(val)}", param=key)
        return val

    def unsupported(body: dict) -> None:
        """Fields of OpenAI's API this server does not implement: refused unless neutral."""
        model = body.get("model")
        if model is not None and model != model_name:
            raise APIError(404, f"model {short(model)} is not served here; this server serves {model_name!r}", param="model", code="model_not_found",
                           kind="not_found_error")
        neutral = {"top_p": (1, 1.0), "logprobs": (False, 0), "top_logprobs": (0,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
                   "logit_bias": ({},), "echo": (False,), "best_of": (1,), "suffix": ("",)}
        for key, ok in neutral.items():
            val = body.get(key)
            if val is not None and not (type(val) in (type(o) for o in ok) and val in ok):
                raise APIError(400, f"`{key}` is not supported by this server (got {short(val)})", param=key, code="unsupported_parameter")
        # features a client relies on for the shape of the answer: refused rather than silently ignored
        for key in ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls"):
            if body.get(key) not in (None, [], "none"):
                raise APIError(400, f"`{key}`: this server does not call tools or functions", param=key, code="unsupported_parameter")
        fmt = body.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise APIError(400, f"`response_format` {short(fmt)}: this server returns free text only (type \"text\")", param="response_format",
                           code="unsupported_parameter")

    def encode(text: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise APIError(400, f"the prompt is not valid Unicode text ({err.reason} at position {err.start})", param="prompt") from None
        return tok(text, add_special_tokens=False)["input_ids"]

    def parse(body: dict, prompt_text: str) -> tuple[GenRequest, dict]:
        unsupported(body)
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is not None:
            body = {**body, "max_tokens": body["max_completion_tokens"]}  # the newer name of the same field
        max_tokens = number(body, "max_tokens", min(64, max_tokens_limit), 1, None, True)
        if max_tokens > max_tokens_limit:
            raise APIError(400, f"`max_tokens` is {max_tokens}; this server allows at most {max_tokens_limit}", param="max_tokens")
        if number(body, "n", 1, 1, 1, True) != 1:
            raise APIError(400, "`n` must be 1", param="n")
        temperature = number(body, "temperature", 1.0, 0.0, 10.0)
        if 0 < temperature < MIN_TEMPERATURE:
            raise APIError(400, f"`temperature` must be 0 (greedy) or in [{MIN_TEMPERATURE}, 10], got {temperature!r}", param="temperature")
        min_tokens = number(body, "min_tokens", 0, 0, max_tokens, True)
        beta = number(body, "beta", 1.0, 0.0, 1e6)
        normalize = flag(body, "normalize", True)
        max_step_kl = number(body, "max_step_kl", 0.0, 0.0, 1e6)
        tail = body.get("tail", "drop")
        if tail is None:
            tail = "drop"
        if tail not in TAILS:
            raise APIError(400, f"`tail` must be one of {', '.join(map(repr, TAILS))}, got {short(tail)}", param="tail")
        tilt_tokens = number(body, "tilt_tokens", 0, 0, max_tokens_limit, True)
        candidate_p = number(body, "candidate_p", 1.0, 0.0, 1.0)
        if candidate_p <= 0:
            raise APIError(400, "`candidate_p` must be in (0, 1]", param="candidate_p")
        seed = number(body, "seed", None, SEED_RANGE[0], SEED_RANGE[1], True)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise APIError(400, "`stop` must be a string or a list of at most 4 strings", param="stop")
        weights = None
        raw_w = body.get("objective_weights")
        if raw_w is not None:
            if not isinstance(raw_w, dict) or not raw_w:
                raise APIError(400, "`objective_weights` must be an object {objective: weight}", param="objective_weights")
            if not objectives:
                raise APIError(400, "this server has no value models loaded; `objective_weights` cannot be honoured", param="objective_weights")
            from ..decoding.tilt import resolve_weights

            for k, v in raw_w.items():
                if v is None:
                    raise APIError(400, f"objective weight for {short(k)} must be a number", param="objective_weights")
                number(raw_w, k, None, 0, MAX_WEIGHT, where=f"objective_weights.{k}")
            try:
                weights = resolve_weights(objectives, raw_w, 1)[0]
            except ValueError as err:
                raise APIError(400, str(err), param="objective_weights", code="invalid_objective") from err
        top_k = number(body, "top_k", DEFAULT_TOP_K if weights is not None else 0, 1 if weights is not None or "top_k" in body else 0, 1000, True)
        config = SamplingConfig(max_new_tokens=max_tokens, min_new_tokens=min_tokens, temperature=temperature or 1.0, greedy=temperature == 0,
                                top_k=top_k, stop_strings=tuple(stop), beta=beta, normalize=normalize,
                                max_step_kl=max_step_kl, tail=tail, tilt_tokens=tilt_tokens,
                                candidate_p=candidate_p)
        ids = encode(prompt_text)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(ids) > max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server allows at most {max_prompt_tokens}", param="prompt",
                           code="context_length_exceeded")
        want_rewards = flag(body, "return_rewards", False)
        req = GenRequest(ids, config, emit=lambda e: None, weights=weights, beta=beta, seed=seed, id=f"cmpl-{uuid.uuid4().hex[:24]}")
        return req, {"return_rewards": want_rewards, "objective_weights": raw_w, "stream": flag(body, "stream", False)}

    def mavis_info(req: GenRequest, done: dict) -> dict:
        info = {"kl": float(sum(g - r for g, r in zip(req.logprobs_gen, req.logprobs_ref))), "beta": req.beta if req.weights is not None else None,
                "objective_weights": dict(zip(objectives, req.weights.tolist())) if req.weights is not None else None,
                "top_k": req.config.top_k if req.weights is not None else None,
                "max_step_kl": (req.config.max_step_kl or None) if req.weights is not None else None,
                "tail": req.config.tail if req.weights is not None else None,
                "tilt_tokens": (req.config.tilt_tokens or None) if req.weights is not None else None,
                "candidate_p": req.config.candidate_p if req.weights is not None and req.config.candidate_p < 1 else None}
        if req.reward_names:
            info["rewards"] = done.get("rewards", {})
        return info

    async def run(request: Request, req: GenRequest, user_prompt: str, extra: dict, chat: bool):
        if extra["return_rewards"]:
            names = list(extra["objective_weights"] or {}) or list(reward_fns)
            req.reward_names, req.reward_prompt = tuple(n for n in names if n in reward_fns), user_prompt
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        req.emit = lambda e: loop.call_soon_threadsafe(q.put_nowait, e)
        try:
            scheduler.submit(req)
        except queue.Full:
            raise APIError(429, f"the server is busy ({scheduler.inbox.maxsize} requests waiting); retry later", code="queue_full",
                           kind="rate_limit_error") from None
        except OverBudget as err:
            raise APIError(400, str(err), param="max_tokens", code="context_length_exceeded") from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down; retry on another replica or later", code="shutting_down",
                           kind="server_error") from None
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def usage():
            return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.tokens), "total_tokens": len(req.prompt_ids) + len(req.tokens)}

        def finish() -> str:
            return {"cancelled": "stop", None: "stop"}.get(req.finish_reason, req.finish_reason)

        if not stream_of(extra):
            checked = loop.time()
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    ev = None
                # token events arrive every step, so look for a departed client on a clock, not on a lull
                if loop.time() - checked >= 0.5:
                    checked = loop.time()
                    if await request.is_disconnected():  # the client left: free its slot
                        req.cancelled.set()
                        raise APIError(499, "client closed the request")
                if ev is None:
                    continue
                if ev["type"] == "error":
                    raise APIError(500, ev["message"], kind="server_error")
                if ev["type"] == "done":
                    break
            info = mavis_info(req, ev)
            choice = {"index": 0, "finish_reason": finish(), "logprobs": None}
            choice.update({"message": {"role": "assistant", "content": req.text}} if chat else {"text": req.text})
            return JSONResponse({"id": req.id, "object": obj, "created": created, "model": model_name, "choices": [choice], "usage": usage(), "mavis": info})

        async def events():
            try:
                if chat:
                    yield sse({"id": req.id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                               "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
                while True:
                    if await request.is_disconnected():
                        req.cancelled.set()
                        return
                    try:
                        ev = await asyncio.wait_for(q.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        continue
                    if ev["type"] == "error":
                        yield sse({"error": {"message": ev["message"], "type": "server_error", "param": None, "code": None}})
                        return
                    if ev["type"] == "token":
                        yield sse(chunk(req, created, chat, ev["text"], None))
                    if ev["type"] == "done":
                        info = mavis_info(req, ev)
                        last = chunk(req, created, chat, "", finish())
                        last["mavis"], last["usage"] = info, usage()
                        yield sse(last)
                        yield "data: [DONE]\n\n"
                        return
            finally:
                if req.finish_reason is None:
                    req.cancelled.set()  # the client went away: free its slot

        return StreamingResponse(events(), media_type="text/event-stream")

    def chunk(req, created, chat, text, finish_reason):
        if chat:
            return {"id": req.id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish_reason}]}
        return {"id": req.id, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}

    def stream_of(extra: dict) -> bool:
        return extra.get("stream", False)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "`prompt` must be a string (or a list of one string)", param="prompt")
        req, extra = await asyncio.to_thread(parse, body, prompt)  # tokenisation off the event loop
        return await run(request, req, prompt, extra, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant") for m in messages):
            raise APIError(400, "`messages` must be a non-empty list of {role: system|user|assistant, content: string}", param="messages")
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        req, extra = await asyncio.to_thread(parse, body, text)  # tokenisation off the event loop
        user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
        return await run(request, req, user, extra, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "mavis-align"}]}

    @app.get("/v1/objectives")
    async def list_objectives(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"name": n, "has_reward": n in reward_fns} for n in objectives]}

    @app.get("/health")
    async def health():
        active = scheduler.active
        return {"status": "ok" if scheduler.drain_deadline is None else "draining", "active": len(active), "queued": scheduler.queued,
                **scheduler.stats, "memory_budget": {"limit": vars(scheduler.budget), "used": scheduler.budget.usage(active)}}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return (resources.files("mavis_align") / "serve" / PAGE).read_text()

    return app


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def check_listen(host: str, port: int) -> None:
    """Raise ValueError (one line) unless ``host:port`` can be listened on now: a busy or invalid
    port fails before any model loads, instead of in uvicorn's thread while the decode loop waits."""
    import socket

    if not 0 < int(port) < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as err:
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def serve(decoder, *, host: str = "127.0.0.1", port: int = 8000, shutdown_grace: float = 30.0, **kwargs) -> None:
    """Run the app (blocking): HTTP in a uvicorn thread, the decode loop in this thread, the one
    that loaded the models (see :meth:`Scheduler.run` for why).

    SIGTERM or Ctrl-C drains: new requests get 503, the accepted ones finish (those still running
    after ``shutdown_grace`` seconds end with the finish reason ``"abort"`` and a well-formed end of
    stream), then the HTTP server closes and this returns. A second signal ends them at once.
    """
    import signal
    import threading

    import uvicorn

    check_listen(host, port)
    app = create_app(decoder, scheduler_thread=False, **kwargs)
    scheduler = app.state.scheduler
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info",
                                           timeout_graceful_shutdown=max(1, int(math.ceil(shutdown_grace)) + 5)))
    web = threading.Thread(target=server.run, name="mavis-http", daemon=True)

    def on_signal(signum, _frame):
        first = scheduler.drain_deadline is None
        scheduler.drain(shutdown_grace if first else 0.0)
        print(f"mavis-align serve: {signal.Signals(signum).name}: " + (f"draining (up to {shutdown_grace:g} s)" if first else "ending now"), flush=True)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    web.start()
    try:
        scheduler.run()  # returns once drained
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        scheduler.shutdown()
        time.sleep(0.2)  # the last events reach the HTTP thread's queues; uvicorn then waits for open responses
        server.should_exit = True
        web.join(timeout=max(10.0, shutdown_grace + 10))
