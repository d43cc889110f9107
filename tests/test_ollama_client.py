"""The one Ollama client: $OLLAMA_HOST read as the Ollama CLI reads it, shared by `ollama --create`,
doctor and the eval runner; exercised against a stand-in server speaking Ollama's API."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edgetune.errors import EdgetuneError
from edgetune.ollama_client import OllamaClient, check_model_name, ollama_base_url, ollama_create

# (OLLAMA_HOST, base URL). The parsing half follows ollama/ollama envconfig Host() and its
# TestHost cases: no scheme -> http + 11434, http:// -> 80, https:// -> 443, path kept, a bad
# port -> the default. The connecting half is ours: a server's bind-all address (0.0.0.0, ::, or
# no host as in ":1234") is reached on loopback.
HOST_CASES = [
    (None, "http://127.0.0.1:11434"),  # unset: the default
    ("", "http://127.0.0.1:11434"),
    ("0.0.0.0", "http://127.0.0.1:11434"),  # what `ollama serve` is often told; a client must not dial it
    ("0.0.0.0:8080", "http://127.0.0.1:8080"),
    (":1234", "http://127.0.0.1:1234"),  # a bare port
    ("1.2.3.4", "http://1.2.3.4:11434"),
    ("1.2.3.4:1234", "http://1.2.3.4:1234"),
    ("example.org", "http://example.org:11434"),
    ("example.org:8080", "http://example.org:8080"),
    ("11434", "http://11434:11434"),  # a bare number is a host name to Ollama too, not a port
    ("http://1.2.3.4", "http://1.2.3.4:80"),
    ("https://ollama.local/", "https://ollama.local:443"),
    ("https://1.2.3.4:4321", "https://1.2.3.4:4321"),
    ("https://example.com/ollama", "https://example.com:443/ollama"),  # behind a proxy path
    ("[::1]", "http://[::1]:11434"),
    ("::1", "http://[::1]:11434"),
    ("[::1]:1337", "http://[::1]:1337"),
    ("[::]", "http://[::1]:11434"),
    (":66000", "http://127.0.0.1:11434"),  # out-of-range port: the default
    (' " 1.2.3.4 " ', "http://1.2.3.4:11434"),  # quotes and blanks from a shell or a unit file
    ("'1.2.3.4'", "http://1.2.3.4:11434"),
    ("ollama.com", "https://ollama.com:443"),
]


@pytest.mark.parametrize(("value", "want"), HOST_CASES)
def test_ollama_host_forms(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv("OLLAMA_HOST", raising=False)
    else:
        monkeypatch.setenv("OLLAMA_HOST", value)
    assert ollama_base_url() == want
    assert OllamaClient().base_url == want
    assert ollama_base_url(value if value is not None else "") == want  # an explicit host reads the same


class _FakeOllama(BaseHTTPRequestHandler):
    """Answers GET /api/version and POST /api/chat with the fields Ollama's API returns."""

    requests: list = []

    def _send(self, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        _FakeOllama.requests.append((self.path, None))
        self._send({"version": "0.9.9"})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeOllama.requests.append((self.path, body))
        self._send({"message": {"role": "assistant", "content": "Hello!"}, "done": True,
                    "eval_count": 20, "eval_duration": 500_000_000})

    def log_message(self, *a):
        pass


@pytest.fixture
def fake_ollama():
    """A stand-in Ollama API on loopback (the default port when free, else any port)."""
    try:
        srv = ThreadingHTTPServer(("127.0.0.1", 11434), _FakeOllama)
    except OSError:
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOllama)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _FakeOllama.requests.clear()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _fake_ollama_exe(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "ollama"
    exe.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path / "argv.txt"}"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")


def test_create_smoke_chat_with_ollama_host_bind_all(tmp_path, monkeypatch, fake_ollama):
    """OLLAMA_HOST=0.0.0.0 (as set for `ollama serve`): `ollama create`'s smoke chat reaches the
    server on loopback. It used to dial http://0.0.0.0 on port 80."""
    _fake_ollama_exe(tmp_path, monkeypatch)
    monkeypatch.setenv("OLLAMA_HOST", "0.0.0.0" if fake_ollama == 11434 else f"0.0.0.0:{fake_ollama}")
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text("FROM ./model.gguf\n")
    res = ollama_create(modelfile, "smol")
    assert res.ran and res.answer == "Hello!" and res.tokens_per_s == pytest.approx(40.0)
    assert (tmp_path / "argv.txt").read_text().split("\n")[:4] == ["create", "smol", "-f", str(modelfile.resolve())]
    path, body = _FakeOllama.requests[-1]
    assert path == "/api/chat" and body["model"] == "smol" and body["stream"] is False


def test_doctor_and_eval_runner_use_the_same_server(monkeypatch, fake_ollama):
    from edgetune.doctor import _ollama
    from edgetune.eval.runners import make_runner

    monkeypatch.setenv("OLLAMA_HOST", f":{fake_ollama}")  # a bare port
    info = _ollama()
    assert info["host"] == f"http://127.0.0.1:{fake_ollama}"
    assert info["server_reachable"] and info["server_version"] == "0.9.9"
    assert _FakeOllama.requests[-1] == ("/api/version", None)
    assert make_runner("ollama:smol").base_url == info["host"]


def test_unreachable_server_is_a_clear_error(monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{port}")
    with pytest.raises(EdgetuneError, match="not reachable") as exc:
        OllamaClient(timeout=5).chat("smol", [{"role": "user", "content": "hi"}])
    assert "ollama serve" in exc.value.fix and str(port) in str(exc.value)


@pytest.mark.parametrize("name", ["smol", "my-model:q4", "team/my.model_2:v1"])
def test_valid_model_names(name):
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", ["", "bad name!", "-x", "a:b:c", "a/b/c"])
def test_invalid_model_names(name):
    with pytest.raises(EdgetuneError, match="not a valid Ollama model name"):
        check_model_name(name)
