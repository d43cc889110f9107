"""The one Ollama client: where the server is (``$OLLAMA_HOST``), its HTTP API, and ``ollama create``.

Used by the eval runner (streamed ``/api/chat``), by ``edgetune ollama --create`` (``ollama
create`` then one smoke chat) and by ``edgetune doctor`` (``/api/version``), so all three find the
same server. Plain ``urllib``: the API is four JSON endpoints, and the ``ollama`` Python package
would be a dependency for them alone.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgetuneError

DEFAULT_PORT = "11434"
# Scheme -> port when OLLAMA_HOST names a scheme but no port. Source: ollama/ollama
# envconfig/config.go Host(): no scheme -> http and 11434; "http://" -> 80; "https://" -> 443.
_SCHEME_PORTS = {"http": "80", "https": "443"}
# Addresses a server binds to mean "every interface"; a client reaches that server on loopback.
# (Go dials an empty or unspecified host as the local system; urllib and Windows do not.)
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def _split_host_port(hostport: str) -> tuple[str, str] | None:
    """Go's net.SplitHostPort: ``host:port`` or ``[v6]:port``; None when it is neither."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or hostport[end + 1:end + 2] != ":" or ":" in hostport[end + 2:]:
            return None
        return hostport[1:end], hostport[end + 2:]
    host, sep, port = hostport.rpartition(":")
    if not sep or ":" in host or "[" in host or "]" in host or "[" in port or "]" in port:
        return None
    return host, port


def ollama_base_url(host: str | None = None) -> str:
    """The base URL a client uses for ``host`` (default: ``$OLLAMA_HOST``), read as the Ollama CLI
    reads it: a bare host (``example.org``), ``host:port``, a bare port (``:11434``), an IPv6
    address (``[::1]:11434``) or a URL with a scheme (``https://example.org/ollama``, path kept).
    Without a scheme it is http with port 11434; ``http://``/``https://`` without a port mean 80/443;
    an invalid port falls back to the default. A server's bind-all address (``0.0.0.0``, ``::`` or
    no host) becomes loopback, where a client on this machine reaches that server.
    """
    s = os.environ.get("OLLAMA_HOST", "") if host is None else host
    s = s.strip().strip("\"'").strip()
    if s == "ollama.com":
        return "https://ollama.com:443"
    scheme, sep, hostport = s.partition("://")
    if not sep:
        scheme, hostport = "http", s
    default_port = _SCHEME_PORTS.get(scheme, DEFAULT_PORT) if sep else DEFAULT_PORT
    hostport, _, path = hostport.partition("/")
    split = _split_host_port(hostport)
    if split is None:
        name, port = "127.0.0.1", default_port
        try:
            name = str(ipaddress.ip_address(hostport.strip("[]")))
        except ValueError:
            if hostport:
                name = hostport
    else:
        name, port = split
    if not re.fullmatch(r"[+-]?[0-9]+", port) or not 0 <= int(port) <= 65535:
        port = default_port
    name = _LOOPBACK.get(name, name)
    netloc = f"[{name}]:{int(port)}" if ":" in name else f"{name}:{int(port)}"
    return f"{scheme}://{netloc}" + (f"/{path.rstrip('/')}" if path.rstrip("/") else "")


class OllamaClient:
    """Ollama's HTTP API at ``ollama_base_url(host)``; failures are :class:`EdgetuneError`\\ s that
    say which server and what to do."""

    def __init__(self, host: str | None = None, timeout: float = 600.0):
        self.base_url = ollama_base_url(host)
        self.timeout = timeout

    def _open(self, path: str, body: dict | None, model: str | None, timeout: float | None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            return urllib.request.urlopen(req, timeout=self.timeout if timeout is None else timeout)
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc, model) from None
        except (urllib.error.URLError, OSError) as exc:
            raise self._unreachable(exc) from None

    def _http_error(self, exc: urllib.error.HTTPError, model: str | None) -> EdgetuneError:
        detail = exc.read().decode("utf-8", "replace")[:300]
        fix = f"ollama create {model} -f Modelfile" if exc.code == 404 and model else "check the Ollama server log"
        return EdgetuneError(f"Ollama at {self.base_url} answered {exc.code}: {detail}", fix=fix)

    def _unreachable(self, exc: Exception) -> EdgetuneError:
        return EdgetuneError(f"Ollama is not reachable at {self.base_url} ({getattr(exc, 'reason', exc)}).",
                             fix="start it with `ollama serve`, or set OLLAMA_HOST")

    def _json(self, raw: bytes) -> dict:
        try:
            return json.loads(raw)
        except ValueError:
            raise EdgetuneError(f"{self.base_url} answered something that is not JSON: {raw[:200]!r}",
                                fix="check that OLLAMA_HOST points at an Ollama server") from None

    def request(self, path: str, body: dict | None = None, *, model: str | None = None,
                timeout: float | None = None) -> dict:
        """GET (no body) or POST one JSON request; the JSON answer."""
        try:
            with self._open(path, body, model, timeout) as resp:
                return self._json(resp.read())
        except (ConnectionError, TimeoutError) as exc:  # dropped or stalled while reading the answer
            raise self._unreachable(exc) from None

    def stream(self, path: str, body: dict, *, model: str | None = None, timeout: float | None = None) -> Iterator[dict]:
        """POST a streamed request; yield each JSON line of the answer."""
        try:
            with self._open(path, body, model, timeout) as resp:
                for line in resp:
                    if line.strip():
                        yield self._json(line)
        except (ConnectionError, TimeoutError) as exc:
            raise self._unreachable(exc) from None

    def version(self, timeout: float | None = None) -> str | None:
        return self.request("/api/version", timeout=timeout).get("version")

    def chat(self, model: str, messages: list[dict], *, options: dict | None = None) -> dict:
        """One non-streamed ``/api/chat``: the final message with Ollama's counts and timings."""
        body = {"model": model, "messages": messages, "stream": False, **({"options": options} if options else {})}
        return self.request("/api/chat", body, model=model)

    def chat_stream(self, model: str, messages: list[dict], *, options: dict | None = None,
                    tools: list[dict] | None = None, think: bool | None = None) -> Iterator[dict]:
        """A streamed ``/api/chat``: one dict per chunk, the last with ``done`` and the counts;
        with ``tools``, a chunk's ``message.tool_calls`` holds the calls Ollama parsed; ``think``
        (not sent when None) turns a thinking model's reasoning on or off (``message.thinking``)."""
        body = {"model": model, "messages": messages, "stream": True, **({"options": options} if options else {}),
                **({"tools": tools} if tools else {}), **({"think": think} if think is not None else {})}
        return self.stream("/api/chat", body, model=model)


def tokens_per_s(answer: dict) -> float | None:
    """Decode speed from an /api/chat answer's own counters (eval_count tokens in eval_duration ns)."""
    n, dur = answer.get("eval_count"), answer.get("eval_duration")
    return n / (dur / 1e9) if n and dur else None


# ============================================================================ ollama create + smoke
@dataclass
class CreateResult:
    ran: bool
    command: str
    message: str = ""
    answer: str = ""
    tokens_per_s: float | None = None


# Ollama model names: name, optional namespace/ and :tag (each starting with a letter or digit).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?(:[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def check_model_name(name: str) -> str:
    """``name`` when it is a valid Ollama model name, else an :class:`EdgetuneError`."""
    if not _NAME_RE.match(name or ""):
        raise EdgetuneError(f"{name!r} is not a valid Ollama model name.",
                            fix="use letters, digits, '.', '_' and '-', optionally namespace/ and :tag (e.g. my-model:q4)")
    return name


def create_command(name: str, modelfile: Path) -> list[str]:
    return ["ollama", "create", name, "-f", str(Path(modelfile).resolve())]


def ollama_create(modelfile, name: str, *, prompt: str = "Say hello in one short sentence.", host: str | None = None,
                  timeout: float = 600) -> CreateResult:
    """``ollama create`` then one chat through ``/api/chat``; when ollama is absent, say what to run."""
    cmd = create_command(check_model_name(name), Path(modelfile))
    text = shlex.join(cmd)
    exe = shutil.which("ollama")
    if exe is None:
        return CreateResult(False, text, f"ollama is not on PATH; to create the model, run:\n  {text}")
    proc = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise EdgetuneError(f"ollama create failed:\n{(proc.stderr or proc.stdout).strip()}", where=str(modelfile))
    answer = OllamaClient(host, timeout).chat(name, [{"role": "user", "content": prompt}])
    return CreateResult(True, text, f"created {name}", (answer.get("message") or {}).get("content", ""),
                        tokens_per_s(answer))
