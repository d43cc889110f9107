"""The team server: several adapters on one loaded base, A/B and shadow routes, bounded queues.

Endpoints (every one behind the API key when one is set): ``GET /v1/models``,
``POST /v1/chat/completions`` (OpenAI format: ``stream``, ``tools`` / ``tool_choice`` and
``response_format`` JSON schemas through the same chat handler as ``edgetune serve MODEL.gguf``),
``POST /v1/completions`` (a plain prompt), ``GET /health``, ``GET /metrics`` (Prometheus text).
Each base decodes its concurrent requests together (continuous batching, :mod:`edgetune.serve.batch`).

A request's ``model`` is a base id, an adapter id or a route id. A split route picks one of its
models by weight — by a hash of ``user`` when the request carries one, so a user stays on one
side. A shadow route answers from its primary and, after the answer is sent, runs the same request
on its candidate; both go to the JSONL log (see README "Serving for a team" for the record format).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from fastapi import Request  # module level: FastAPI resolves the handlers' string annotations here

from ..eval.metrics import passes_reference
from .canary import Canary
from .engine import BadRequest, Completion, Overloaded, Pool, response_schema
from .feedback import Answered, FeedbackError, RecentRequests, parse_feedback
from .metrics import Metrics
from .team_config import TeamConfig

log = logging.getLogger("edgetune.serve")


def pick(cfg: TeamConfig, model: str, user: str | None, rng: random.Random | None = None) -> tuple[str, str | None, str | None]:
    """(the model id that answers, the shadow candidate or None, the route name or None)."""
    r = cfg.routes.get(model)
    if r is None:
        return model, None, None
    if r.primary:
        return r.primary, r.shadow, r.name
    total = sum(r.split.values())
    if user:  # sticky: the same user lands on the same side for as long as the weights stay
        x = int.from_bytes(hashlib.sha256(f"{r.name}\0{user}".encode()).digest()[:8], "big") / 2**64
    else:
        x = (rng or random).random()
    acc = 0.0
    for mid, w in r.split.items():
        acc += w / total
        if x < acc:
            return mid, None, r.name
    return next(reversed(r.split)), None, r.name


class TrafficLog:
    """Append-only JSONL; one line per routed request, written whole under a lock."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _answer_record(model: str, c: Completion | None, latency: float, error: str | None = None) -> dict:
    rec: dict = {"model": model, "latency_ms": round(latency * 1000, 1)}
    if c is not None:
        rec.update(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens, finish_reason=c.finish_reason,
                   text=c.text)
    if error:
        rec["error"] = error
    return rec


def _error(status: int, message: str, kind: str, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status, headers=headers)


def _usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def _completion_json(rid: str, model: str, c: Completion, text: bool = False) -> dict:
    if text:
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}],
                "usage": _usage(c)}
    message = {"role": "assistant", "content": c.text if c.text or not c.tool_calls else None,
               **({"reasoning_content": c.reasoning} if c.reasoning else {}),
               **({"tool_calls": c.tool_calls} if c.tool_calls else {})}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": c.finish_reason}], "usage": _usage(c)}


def _chunk(rid: str, model: str, delta: dict, finish: str | None = None, text: bool = False) -> str:
    if text:
        body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "text": delta.get("text", ""), "logprobs": None, "finish_reason": finish}]}
    else:
        body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _validate(body, text: bool = False) -> None:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if text:
        if not isinstance(body.get("prompt"), str):
            raise BadRequest("`prompt` must be one string")
    else:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise BadRequest("`messages` must be a non-empty list of {role, content} objects")
        for m in msgs:  # OpenAI clients send an assistant tool-call turn back with content null
            if m.get("content") is None:
                m["content"] = ""
        tools = body.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) and isinstance(t.get("function"), dict)
                                                                      and t["function"].get("name") for t in tools)):
            raise BadRequest("`tools` must be a list of {type: function, function: {name, parameters}} objects")
        response_schema(body)
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported")


class _KeyCheck:
    """API key on every route, as plain ASGI middleware (Starlette's ``BaseHTTPMiddleware`` wraps
    ``receive`` so the endpoint no longer sees the client disconnect, which cancellation needs)."""

    def __init__(self, app, key: str):
        self.app, self.want = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.want):
                await _error(401, "missing or wrong API key", "invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def make_team_app(cfg: TeamConfig, *, api_key: str | None = None, n_threads: int | None = None):
    """The FastAPI app for ``cfg`` (nothing is loaded until a request needs it)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    from .single import _threads

    pool = Pool(cfg, _threads(n_threads))
    metrics = Metrics()
    traffic = TrafficLog(cfg.shadow_log)
    feedback_log = TrafficLog(cfg.feedback_log)
    recent = RecentRequests(cfg.feedback_ttl_s)
    canaries = {name: Canary(name, r.canary) for name, r in cfg.routes.items() if r.canary is not None}
    background: set[asyncio.Task] = set()
    app = FastAPI(title="edgetune team server")
    app.state.pool, app.state.metrics, app.state.background = pool, metrics, background
    app.state.canaries, app.state.recent = canaries, recent

    if api_key:
        app.add_middleware(_KeyCheck, key=api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok", "bases": {n: {"loaded": b.llm is not None, "waiting": b.waiting, "running": b.running,
                                              "parallel": b.spec.parallel,
                                              **({"batch": dict(b.engine.stats)} if b.engine is not None else {})}
                                          for n, b in pool.bases.items()}}

    @app.get("/metrics")
    async def prom():
        queues = {n: (b.waiting, b.running, b.llm is not None) for n, b in pool.bases.items()}
        return PlainTextResponse(metrics.render(queues), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        data = [{"id": m, "object": "model", "created": now, "owned_by": "edgetune"} for m in cfg.model_ids()]
        data += [{"id": r, "object": "model", "created": now, "owned_by": "edgetune-route"} for r in cfg.routes]
        return {"object": "list", "data": data}

    async def shadow_run(route: str, cand: str, body: dict, rid: str, primary: dict, reference) -> None:
        t0 = time.perf_counter()
        try:
            c = await pool.submit(cand, body, background=True)
            rec, status = _answer_record(cand, c, time.perf_counter() - t0), 200
            metrics.observe(cand, 200, time.perf_counter() - t0, c.completion_tokens, c.seconds)
            metrics.shadow["done"] += 1
        except Overloaded as exc:
            rec, status = _answer_record(cand, None, time.perf_counter() - t0, f"overloaded: {exc.reason}"), 503
            metrics.shadow["dropped"] += 1
        except Exception as exc:  # a failing candidate must never hurt the primary's traffic
            log.exception("shadow request %s on %s failed", rid, cand)
            rec, status = _answer_record(cand, None, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"), 500
            metrics.shadow["failed"] += 1
        record = {"ts": _now(), "kind": "shadow", "route": route, "request_id": rid, "primary": primary, "candidate": rec}
        if reference is not None:
            record["reference"] = reference
        if cfg.log_text:
            record["messages"] = body["messages"]
        traffic.write(record)
        log.info("shadow %s route=%s candidate=%s status=%s", rid, route, cand, status)

    def settle(route: str, action: str, nums: dict, by: str) -> None:
        """A canary decision (from its test or by hand): move the registry alias on promotion, log it."""
        can = canaries[route]
        moved = None
        if action == "promote" and can.spec.promote_model:
            cand, _ = cfg.locate(can.spec.candidate)
            if cand.version:
                from ..aliases import promote

                entry = promote(cand.version, can.spec.promote_alias, force=by == "hand",
                                reason=f"canary {route}: {nums.get('why') or by}")
                moved = f"{can.spec.promote_model}@{can.spec.promote_alias} -> {entry.ref}"
        record = {"ts": _now(), "kind": "canary_decision", "route": route, "action": action, "by": by, **nums,
                  **({"alias": moved} if moved else {})}
        traffic.write(record)
        log.warning("canary %s: %s (%s) %s", route, action, by, json.dumps(nums))

    def outcome(route: str | None, side: str | None, success: bool) -> None:
        if route not in canaries or side is None:
            return
        decided = canaries[route].record(side, success)
        if decided is not None:
            try:
                settle(route, *decided, by="test")
            except Exception:  # noqa: BLE001 - a failed alias move is logged; the route already stopped the canary
                log.exception("canary %s: applying %s failed", route, decided[0])

    def finish(rid, model, shadow, route, body, c: Completion, t0, side: str | None = None) -> None:
        latency = time.perf_counter() - t0
        if not c.cancelled and "messages" in body:  # what feedback on this id will refer to
            recent.add(rid, Answered(model, time.time(), route, side, body["messages"] if cfg.log_text else None,
                                     c.text if cfg.log_text else None))
        metrics.observe(model, 200, latency, c.completion_tokens, c.seconds)
        log.info("%s model=%s route=%s 200 %.0f ms prompt=%d completion=%d%s", rid, model, route, latency * 1000,
                 c.prompt_tokens, c.completion_tokens, f" messages={json.dumps(body.get('messages', body.get('prompt')))}" if cfg.log_text else "")
        reference = (body.get("metadata") or {}).get("reference") if isinstance(body.get("metadata"), dict) else None
        if shadow and not c.cancelled:
            task = asyncio.create_task(shadow_run(route, shadow, body, rid, _answer_record(model, c, latency), reference))
            background.add(task)
            task.add_done_callback(background.discard)
        elif route:
            rec = {"ts": _now(), "kind": "canary" if side else "split", "route": route, "request_id": rid,
                   **({"side": side} if side else {}),
                   **{k: v for k, v in _answer_record(model, c, latency).items() if k != "text"}}
            traffic.write(rec)
        if side and isinstance(reference, str) and not c.cancelled:  # a task check is an outcome too
            outcome(route, side, passes_reference(c.text, reference))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _answer(request, text=False)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _answer(request, text=True)

    async def _answer(request, text: bool):
        t0 = time.perf_counter()
        rid = ("cmpl-" if text else "chatcmpl-") + uuid.uuid4().hex[:24]
        try:
            body = await request.json()
            _validate(body, text)
        except (BadRequest, ValueError) as exc:
            return _error(400, str(exc), "invalid_request_error")
        asked = body.get("model")
        side = None
        if isinstance(asked, str) and asked in canaries:
            (model, side), shadow, route = canaries[asked].pick(body.get("user")), None, asked
        else:
            model, shadow, route = pick(cfg, asked, body.get("user")) if isinstance(asked, str) else (None, None, None)
        try:
            cfg.locate(model)
        except KeyError:
            metrics.observe(str(asked), 404, 0)
            return _error(404, f"model {asked!r} is not served here; see /v1/models", "model_not_found")
        if text:
            shadow = None  # shadow pairs are chats (eval shadow reads messages)
        headers = {"x-edgetune-model": model, "x-request-id": rid}
        if body.get("stream"):
            return await _stream(request, rid, model, shadow, route, body, t0, headers, text, side)
        try:
            c = await pool.submit(model, body, disconnected=request.is_disconnected, text=text)
        except Overloaded as exc:
            metrics.observe(model, 503, time.perf_counter() - t0)
            log.info("%s model=%s 503 %s", rid, model, exc.reason)
            return _error(503, f"server busy: {exc.reason}", "overloaded", {"Retry-After": str(exc.retry_after)})
        except ValueError as exc:  # the request, not the server: too long for the context, a schema that does not compile
            metrics.observe(model, 400, time.perf_counter() - t0)
            return _error(400, str(exc), "invalid_request_error")
        if c.cancelled:
            metrics.observe(model, 499, time.perf_counter() - t0)
            log.info("%s model=%s cancelled (client went away) after %d tokens", rid, model, c.completion_tokens)
            return _error(499, "client closed the request", "cancelled")
        finish(rid, model, shadow, route, body, c, t0, side)
        version = cfg.locate(model)[0].version
        return JSONResponse(_completion_json(rid, model, c, text),
                            headers={**headers, **({"x-edgetune-version": version} if version else {})})

    async def _stream(request, rid, model, shadow, route, body, t0, headers, text, side=None):
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        turn = asyncio.Event()
        task = asyncio.create_task(pool.submit(model, body, on_turn=turn.set, text=text,
                                               on_delta=lambda d: loop.call_soon_threadsafe(pieces.put_nowait, d)))
        task.add_done_callback(lambda _t: pieces.put_nowait(None))
        # wait for a turn (or a refusal) before answering: a refusal must be a real 503, not a broken stream
        waiter = asyncio.create_task(turn.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done() and isinstance(task.exception(), Overloaded):
            exc = task.exception()
            metrics.observe(model, 503, time.perf_counter() - t0)
            return _error(503, f"server busy: {exc.reason}", "overloaded", {"Retry-After": str(exc.retry_after)})
        if task.done() and isinstance(task.exception(), ValueError):
            metrics.observe(model, 400, time.perf_counter() - t0)
            return _error(400, str(task.exception()), "invalid_request_error")

        async def events():
            try:
                if not text:
                    yield _chunk(rid, model, {"role": "assistant", "content": ""})
                while (d := await pieces.get()) is not None:
                    yield _chunk(rid, model, d, text=text)
                exc = task.exception()
                if exc is not None:
                    status = 503 if isinstance(exc, Overloaded) else 400 if isinstance(exc, ValueError) else 500
                    metrics.observe(model, status, time.perf_counter() - t0)
                    yield f"data: {json.dumps({'error': {'message': str(exc), 'code': status}})}\n\n"
                    return
                c = task.result()
                yield _chunk(rid, model, {}, c.finish_reason, text=text)
                if (body.get("stream_options") or {}).get("include_usage"):  # OpenAI: a last chunk with usage only
                    last = {"id": rid, "object": "text_completion" if text else "chat.completion.chunk",
                            "created": int(time.time()), "model": model, "choices": [], "usage": _usage(c)}
                    yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"
                finish(rid, model, shadow, route, body, c, t0, side)
            finally:
                if not task.done():  # the client went away mid-stream
                    task.cancel()
                    metrics.observe(model, 499, time.perf_counter() - t0)

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        try:
            try:
                body = await request.json()
            except ValueError:
                raise FeedbackError(400, "the feedback body must be JSON") from None
            rid, rating, correction, tags = parse_feedback(body)
            item, first = recent.take(rid)
        except FeedbackError as exc:
            return _error(exc.status, exc.message, "invalid_request_error" if exc.status == 400 else "not_found")
        record = {"ts": _now(), "kind": "feedback", "request_id": rid, "model": item.model, "rating": rating,
                  **({"route": item.route} if item.route else {}), **({"side": item.side} if item.side else {}),
                  **({"tags": tags} if tags else {})}
        if cfg.log_text:  # texts only where the deployment keeps them
            record.update(messages=item.messages, answer=item.answer, **({"correction": correction} if correction else {}))
        feedback_log.write(record)
        metrics.feedback[rating] += 1
        if first:
            outcome(item.route, item.side, rating == "up")
        return {"ok": True, "request_id": rid, "logged": cfg.feedback_log is not None}

    @app.get("/v1/canary/{route}")
    async def canary_state(route: str):
        if route not in canaries:
            return _error(404, f"no canary route {route!r}; canary routes: {sorted(canaries)}", "not_found")
        return canaries[route].state()

    @app.post("/v1/canary/{route}")
    async def canary_override(route: str, request: Request):
        if route not in canaries:
            return _error(404, f"no canary route {route!r}; canary routes: {sorted(canaries)}", "not_found")
        try:
            action = (await request.json()).get("action")
        except (ValueError, AttributeError):
            action = None
        if action not in ("promote", "rollback", "pause", "resume"):
            return _error(400, "`action` must be promote, rollback, pause or resume", "invalid_request_error")
        can = canaries[route]
        with can.lock:
            nums = can.state()["now"]
            can.settle(action, nums, by="hand")
        if action in ("promote", "rollback"):
            await asyncio.to_thread(settle, route, action, nums, "hand")
        return can.state()

    @app.exception_handler(Exception)
    async def unexpected(request, exc):  # the traceback goes to the log, never to the client
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, f"internal error ({type(exc).__name__})", "server_error")

    return app


def make_team_server(cfg: TeamConfig, *, host: str = "127.0.0.1", port: int | None = 8080, api_key: str | None = None,
                     n_threads: int | None = None, log_level: str = "warning"):
    """A :class:`LocalServer` for ``cfg`` on ``host:port`` (``port=None``: a free port), not yet started."""
    import uvicorn

    from .single import LocalServer, free_port

    port = port or free_port(host)
    app = make_team_app(cfg, api_key=api_key, n_threads=n_threads)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    return LocalServer(server, host, port)
