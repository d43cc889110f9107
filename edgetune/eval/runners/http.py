"""Runners for models behind an HTTP API: Ollama (``/api/chat``) and any OpenAI-compatible server.

The server renders the chat template (Ollama from the Modelfile's TEMPLATE, llama-server /
``edgetune serve`` from the GGUF's template), so these runners send messages, not prompts. Both
stream, so time-to-first-token is measured where the user would feel it. No logits are exposed
by these APIs, so NLL and drift are not available here.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from ...errors import EdgetuneError, MissingDependencyError
from .base import Generation, GenParams, Runner, Timer, cut_at_stop

DEFAULT_OLLAMA = "http://127.0.0.1:11434"


def ollama_base_url(host: str | None = None) -> str:
    """``$OLLAMA_HOST`` as Ollama's own client reads it: bare ``host[:port]`` or a URL."""
    h = (host or os.environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA).strip().rstrip("/")
    if "://" not in h:
        h = "http://" + h
    scheme, rest = h.split("://", 1)
    hostport = rest.split("/", 1)[0]
    if hostport.startswith("0.0.0.0"):
        hostport = hostport.replace("0.0.0.0", "127.0.0.1", 1)
    if ":" not in hostport.rsplit("]", 1)[-1]:
        hostport += ":11434"
    return f"{scheme}://{hostport}"


class OllamaRunner(Runner):
    kind = "ollama"

    def __init__(self, target: str, adapter: str | None = None, host: str | None = None, timeout: float = 600.0):
        super().__init__(f"ollama:{target}")
        if adapter:
            raise EdgetuneError("The ollama runner takes a model name; the adapter belongs in its Modelfile (ADAPTER).",
                                fix="edgetune ollama writes a Modelfile with the adapter; evaluate ollama:NAME")
        self.model = target
        self.base_url = ollama_base_url(host)
        self.timeout = timeout

    def generate(self, messages: list[dict], params: GenParams) -> Generation:
        options = {"temperature": params.temperature, "num_predict": params.max_tokens, "seed": params.seed}
        if params.temperature > 0:
            options.update(top_p=params.top_p, top_k=params.top_k or None)
        if params.stop:
            options["stop"] = list(params.stop)
        body = json.dumps({"model": self.model, "messages": messages, "stream": True,
                           "options": {k: v for k, v in options.items() if v is not None}}).encode()
        req = urllib.request.Request(f"{self.base_url}/api/chat", data=body, headers={"Content-Type": "application/json"})
        timer = Timer()
        text, final = "", {}
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                for line in resp:
                    if not line.strip():
                        continue
                    msg = json.loads(line)
                    if "error" in msg:
                        raise EdgetuneError(f"Ollama error for {self.model!r}: {msg['error']}")
                    piece = (msg.get("message") or {}).get("content") or ""
                    if piece:
                        timer.first()
                        text += piece
                    if msg.get("done"):
                        final = msg
                        break
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            fix = f"ollama create {self.model} -f Modelfile" if exc.code == 404 else "check the Ollama server log"
            raise EdgetuneError(f"Ollama at {self.base_url} answered {exc.code}: {detail}", fix=fix) from None
        except (urllib.error.URLError, ConnectionError) as exc:
            raise EdgetuneError(f"Ollama is not reachable at {self.base_url} ({getattr(exc, 'reason', exc)}).",
                                fix="start it with `ollama serve`, or set OLLAMA_HOST") from None
        total = timer.elapsed()
        text, hit = cut_at_stop(text, params.stop) if params.stop else (text, False)
        n = int(final.get("eval_count") or 0)
        # Ollama reports its own decode time; it excludes HTTP overhead, so prefer it for tokens/s
        ttft = timer.ttft
        if final.get("eval_duration") and n > 1 and ttft is not None:
            total = ttft + final["eval_duration"] / 1e9 * (n - 1) / n
        reason = final.get("done_reason") or ("stop" if hit else "length")
        return Generation(text, int(final.get("prompt_eval_count") or 0), n, ttft, total, "stop" if reason == "stop" else "length")

    def info(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "model": self.model, "base_url": self.base_url}


class OpenAIRunner(Runner):
    """``openai:MODEL@BASE_URL``, ``openai:BASE_URL`` (first model the server lists) or
    ``openai:MODEL`` (base URL from ``$OPENAI_BASE_URL``). Key: ``$OPENAI_API_KEY`` (or none)."""

    kind = "openai"

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

    def generate(self, messages: list[dict], params: GenParams) -> Generation:
        openai = self._openai
        kw = dict(model=self.model, messages=messages, max_tokens=params.max_tokens, temperature=params.temperature,
                  seed=params.seed, stream=True)
        if params.temperature > 0:
            kw["top_p"] = params.top_p
        if params.stop:
            kw["stop"] = list(params.stop)
        timer = Timer()
        try:
            stream = self.client.chat.completions.create(
                **kw, **({"stream_options": {"include_usage": True}} if self._usage_option else {}))
        except openai.BadRequestError:
            if not self._usage_option:
                raise
            self._usage_option = False
            return self.generate(messages, params)
        except openai.APIConnectionError as exc:
            raise EdgetuneError(f"Cannot reach {self.base_url} ({exc}).", fix="start the server (edgetune serve) or fix the URL") from None
        except openai.APIStatusError as exc:
            raise EdgetuneError(f"{self.base_url} answered {exc.status_code}: {exc.message}") from None
        text, chunks, usage, finish = "", 0, None, "length"
        for chunk in stream:
            if getattr(chunk, "usage", None):
                usage = chunk.usage
            for choice in chunk.choices or []:
                piece = choice.delta.content if choice.delta else None
                if piece:
                    timer.first()
                    text += piece
                    chunks += 1
                if choice.finish_reason:
                    finish = choice.finish_reason
        total = timer.elapsed()
        # Without usage, count streamed chunks: servers send one per token (a close lower bound).
        n = usage.completion_tokens if usage else chunks
        p = usage.prompt_tokens if usage else 0
        return Generation(text, p, n, timer.ttft, total, "stop" if finish == "stop" else "length")

    def info(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "model": self.model, "base_url": self.base_url}
