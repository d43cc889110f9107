"""Runners for models behind an HTTP API: Ollama (``/api/chat``) and any OpenAI-compatible server.

The server renders the chat template (Ollama from the Modelfile's TEMPLATE, llama-server /
``edgetune serve`` from the GGUF's template), so these runners send messages, not prompts. Both
stream, so time-to-first-token is measured where the user would feel it. No logits are exposed
by these APIs, so NLL and drift are not available here.
"""

from __future__ import annotations

import os
from contextlib import closing

from ...errors import EdgetuneError, MissingDependencyError
from ...ollama_client import OllamaClient
from .base import Generation, GenParams, Runner, Timer, cut_at_stop


class OllamaRunner(Runner):
    kind = "ollama"
    spec = "ollama:MODEL_NAME  (server at $OLLAMA_HOST, default 127.0.0.1:11434)"

    def __init__(self, target: str, adapter: str | None = None, host: str | None = None, timeout: float = 600.0):
        super().__init__(f"ollama:{target}")
        if adapter:
            raise EdgetuneError("The ollama runner takes a model name; the adapter belongs in its Modelfile (ADAPTER).",
                                fix="edgetune ollama writes a Modelfile with the adapter; evaluate ollama:NAME")
        self.model = target
        self.client = OllamaClient(host, timeout)  # $OLLAMA_HOST when host is None
        self.base_url = self.client.base_url

    def generate(self, messages: list[dict], params: GenParams, tools: list[dict] | None = None) -> Generation:
        options = {"temperature": params.temperature, "num_predict": params.max_tokens, "seed": params.seed}
        if params.temperature > 0:
            options.update(top_p=params.top_p, top_k=params.top_k or None)
        if params.stop:
            options["stop"] = list(params.stop)
        timer = Timer()
        text, final, calls, why = "", {}, [], ""
        if tools:  # Ollama wants a call's arguments as an object, as the template prints them
            from ...toolcalls import prepare_messages

            messages = prepare_messages(messages)
        stream = self.client.chat_stream(self.model, messages, options={k: v for k, v in options.items() if v is not None},
                                         tools=tools, think=params.think)
        with closing(stream):  # closes the connection when the loop ends early
            for msg in stream:
                if "error" in msg:
                    raise EdgetuneError(f"Ollama error for {self.model!r}: {msg['error']}")
                piece = (msg.get("message") or {}).get("content") or ""
                if piece:
                    timer.first()
                    text += piece
                thought = (msg.get("message") or {}).get("thinking") or ""
                if thought:
                    timer.first()
                    why += thought
                if (msg.get("message") or {}).get("tool_calls"):
                    timer.first()
                    calls += msg["message"]["tool_calls"]
                if msg.get("done"):
                    final = msg
                    break
        total = timer.elapsed()
        text, hit = cut_at_stop(text, params.stop) if params.stop else (text, False)
        n = int(final.get("eval_count") or 0)
        # Ollama reports its own decode time; it excludes HTTP overhead, so prefer it for tokens/s
        ttft = timer.ttft
        if final.get("eval_duration") and n > 1 and ttft is not None:
            total = ttft + final["eval_duration"] / 1e9 * (n - 1) / n
        reason = final.get("done_reason") or ("stop" if hit else "length")
        gen = Generation(text, int(final.get("prompt_eval_count") or 0), n, ttft, total, "stop" if reason == "stop" else "length",
                         reasoning=why.strip() or None)
        if tools:  # Ollama parsed the calls with the Modelfile's template; text it could not parse stays content
            from ..tools import normalise_calls

            gen.tool_calls = normalise_calls(calls)
        return gen

    def info(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "model": self.model, "base_url": self.base_url}


class OpenAIRunner(Runner):
    """``openai:MODEL@BASE_URL``, ``openai:BASE_URL`` (first model the server lists) or
    ``openai:MODEL`` (base URL from ``$OPENAI_BASE_URL``). Key: ``$OPENAI_API_KEY`` (or none)."""

    kind = "openai"
    spec = "openai:MODEL@BASE_URL | openai:BASE_URL | openai:MODEL  (base URL from $OPENAI_BASE_URL)"

    def __init__(self, target: str, adapter: str | None = None, api_key: str | None = None, timeout: float = 600.0):
        super().__init__(f"openai:{target}")
        try:
            import openai
        except ImportError:
            raise MissingDependencyError("openai", "eval", "The openai runner") from None
        if adapter:
            raise EdgetuneError("The openai runner cannot attach an adapter; serve the model with it instead.",
                                fix="edgetune serve MODEL.gguf --adapter LORA.gguf")
        model, base = None, None
        if "@" in target and "://" in target.split("@", 1)[1]:
            model, base = target.split("@", 1)
        elif "://" in target:
            base = target
        else:
            model, base = target, os.environ.get("OPENAI_BASE_URL")
        self.client = openai.OpenAI(base_url=base, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none",
                                    timeout=timeout, max_retries=0)
        self._openai = openai
        self.base_url = str(self.client.base_url)
        if model is None:
            try:
                model = self.client.models.list().data[0].id
            except (openai.APIError, IndexError) as exc:
                raise EdgetuneError(f"No model listed at {self.base_url}/models ({exc}).",
                                    fix="name it: openai:MODEL@URL") from None
        self.model = model
        self._usage_option = True  # stream_options.include_usage; dropped if the server rejects it

    def generate(self, messages: list[dict], params: GenParams, tools: list[dict] | None = None) -> Generation:
        openai = self._openai
        kw = dict(model=self.model, messages=messages, max_tokens=params.max_tokens, temperature=params.temperature,
                  seed=params.seed, stream=True)
        if tools:
            kw["tools"] = tools
        if params.temperature > 0:
            kw["top_p"] = params.top_p
        if params.stop:
            kw["stop"] = list(params.stop)
        if params.think is not None:  # vLLM's / llama.cpp's / edgetune serve's switch for thinking templates
            kw["extra_body"] = {"chat_template_kwargs": {"enable_thinking": params.think}}
        timer = Timer()
        try:
            stream = self.client.chat.completions.create(
                **kw, **({"stream_options": {"include_usage": True}} if self._usage_option else {}))
        except openai.BadRequestError:
            if not self._usage_option:
                raise
            self._usage_option = False
            return self.generate(messages, params, tools)
        except openai.APIConnectionError as exc:
            raise EdgetuneError(f"Cannot reach {self.base_url} ({exc}).", fix="start the server (edgetune serve) or fix the URL") from None
        except openai.APIStatusError as exc:
            raise EdgetuneError(f"{self.base_url} answered {exc.status_code}: {exc.message}") from None
        text, chunks, usage, finish, why = "", 0, None, "length", ""
        calls: dict[int, dict] = {}  # streamed tool calls by index: name, then arguments in pieces
        for chunk in stream:
            if getattr(chunk, "usage", None):
                usage = chunk.usage
            for choice in chunk.choices or []:
                piece = choice.delta.content if choice.delta else None
                if piece:
                    timer.first()
                    text += piece
                    chunks += 1
                thought = getattr(choice.delta, "reasoning_content", None) if choice.delta else None
                if thought:
                    timer.first()
                    why += thought
                    chunks += 1
                for tc in (choice.delta.tool_calls if choice.delta else None) or []:
                    timer.first()
                    c = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                    c["name"] += (tc.function.name or "") if tc.function else ""
                    c["arguments"] += (tc.function.arguments or "") if tc.function else ""
                if choice.finish_reason:
                    finish = choice.finish_reason
        total = timer.elapsed()
        # Without usage, count streamed chunks: servers send one per token (a close lower bound).
        n = usage.completion_tokens if usage else chunks
        p = usage.prompt_tokens if usage else 0
        gen = Generation(text, p, n, timer.ttft, total, "stop" if finish in ("stop", "tool_calls") else "length",
                         reasoning=why.strip() or None)
        if tools:
            gen.tool_calls, gen.tool_error = _server_calls(calls, finish)
        return gen

    def info(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "model": self.model, "base_url": self.base_url}


def _server_calls(calls: dict[int, dict], finish: str) -> tuple[list[dict], str | None]:
    """Streamed OpenAI tool calls -> (calls with parsed arguments, error). A call whose arguments
    are not a JSON object is an error; so is edgetune serve's ``invalid_tool_call`` finish."""
    import json

    from ...toolcalls import INVALID

    out, error = [], None
    for _, c in sorted(calls.items()):
        try:
            args = json.loads(c["arguments"] or "{}")
        except ValueError as exc:
            args, error = c["arguments"], f"the arguments of {c['name']!r} are not valid JSON ({exc})"
        out.append({"name": c["name"], "arguments": args})
    if finish == INVALID and not out:
        error = "the server could not parse the model's tool call (finish_reason invalid_tool_call)"
    return out, error
