"""Serve a GGUF over an OpenAI-compatible HTTP API, or chat with it in the terminal.

Both run on llama.cpp through ``llama-cpp-python``: the server is its FastAPI app
(``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, streaming), the chat uses
``Llama.create_chat_completion``. The chat template is the GGUF's own ``tokenizer.chat_template``
(forced, so llama-cpp-python does not swap in a built-in format it guesses from the template),
which is the template edgetune exported with the model — the prompt served is the prompt trained.
OpenAI ``tools`` / ``tool_choice`` are rendered through that template and the model's calls come
back as ``tool_calls`` (:mod:`edgetune.toolcalls`).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgetuneError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_N_CTX = 4096


def _check_files(model, adapter) -> tuple[Path, Path | None]:
    m = Path(model)
    if not m.is_file():
        raise EdgetuneError(f"GGUF file not found: {m}", where=str(m), exit_code=2)
    a = Path(adapter) if adapter else None
    if a is not None and not a.is_file():
        raise EdgetuneError(f"Adapter GGUF not found: {a}", where=str(a), exit_code=2)
    return m, a


def _has_chat_template(model: Path) -> bool:
    from ..export.model_info import info_from_gguf

    return bool(info_from_gguf(model).chat_template)


def _chat_format(model: Path) -> str | None:
    """The GGUF's own template through edgetune's tool-call handler (edgetune/toolcalls.py);
    None (llama-cpp-python's guess) when the GGUF has no template."""
    if not _has_chat_template(model):
        return None
    from ..toolcalls import register_handler

    return register_handler()


def _threads(n_threads: int | None) -> int:
    return n_threads or max(1, (os.cpu_count() or 2) // 2)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_app(model, *, adapter=None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, api_key: str | None = None,
             n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None, alias: str | None = None, verbose: bool = False,
             logits_all: bool = False):
    """The llama-cpp-python FastAPI app for ``model`` (one per process: the server keeps global state).

    ``logits_all`` is off by default (llama-cpp-python's server turns it on): computing logits for
    every prompt token makes each request several times slower and only prompt ``logprobs`` need it.
    """
    m, a = _check_files(model, adapter)
    try:
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as exc:
        raise EdgetuneError(f"The server needs llama-cpp-python with its server extra ({exc}).",
                            fix="pip install 'llama-cpp-python[server]'") from None
    model_settings = ModelSettings(
        model=str(m), model_alias=alias or m.stem, lora_path=str(a) if a else None, n_ctx=n_ctx,
        n_threads=_threads(n_threads), n_threads_batch=_threads(n_threads),
        chat_format=_chat_format(m), verbose=verbose, logits_all=logits_all,
    )
    server_settings = ServerSettings(host=host, port=port, api_key=api_key)
    app = create_app(server_settings=server_settings, model_settings=[model_settings])
    from ..toolcalls import NullContentFix

    app.add_middleware(NullContentFix)  # assistant tool-call turns sent back with content null
    return app


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class LocalServer:
    """A running server in a background thread: ``with make_server(...) as srv: srv.base_url``."""

    server: object  # uvicorn.Server
    host: str
    port: int
    thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 120) -> LocalServer:
        self.thread = threading.Thread(target=self.server.run, name="edgetune-serve", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not getattr(self.server, "started", False):
            if not self.thread.is_alive():
                raise EdgetuneError(f"The server on {self.host}:{self.port} failed to start.",
                                    fix="see the messages above; is the port already in use?")
            if time.monotonic() > deadline:
                raise EdgetuneError(f"The server did not start within {timeout:.0f} s.")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 30) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def make_server(model, *, adapter=None, host: str = DEFAULT_HOST, port: int | None = DEFAULT_PORT, api_key: str | None = None,
                n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None, alias: str | None = None,
                log_level: str = "warning", logits_all: bool = False) -> LocalServer:
    """A server for ``model`` on ``host:port`` (``port=None``/0: a free port), not yet started."""
    import uvicorn

    port = port or free_port(host)
    app = make_app(model, adapter=adapter, host=host, port=port, api_key=api_key, n_ctx=n_ctx, n_threads=n_threads,
                   alias=alias, logits_all=logits_all)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level)
    return LocalServer(uvicorn.Server(config), host, port)


def serve(model, *, adapter=None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, api_key: str | None = None,
          n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None, alias: str | None = None,
          log_level: str = "info") -> None:
    """Serve until interrupted (blocking)."""
    srv = make_server(model, adapter=adapter, host=host, port=port, api_key=api_key, n_ctx=n_ctx,
                      n_threads=n_threads, alias=alias, log_level=log_level)
    srv.server.run()


# ---------------------------------------------------------------------------------------- chat
def load_llm(model, *, adapter=None, n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None, verbose: bool = False):
    m, a = _check_files(model, adapter)
    from llama_cpp import Llama

    return Llama(model_path=str(m), lora_path=str(a) if a else None, n_ctx=n_ctx, n_threads=_threads(n_threads),
                 chat_format=_chat_format(m), verbose=verbose)


CHAT_HELP = ("commands: /system TEXT (set the system prompt), /system (clear it), /think on|off|default "
             "(thinking models), /reset (forget the chat), /exit")


def chat_loop(llm, *, system: str | None = None, read: Callable[[str], str] = input,
              write: Callable[[str], None] | None = None, max_tokens: int = 512, temperature: float = 0.7) -> list[dict]:
    """Interactive chat with history; returns the history when the user leaves (/exit or EOF)."""
    if write is None:
        def write(s: str) -> None:
            sys.stdout.write(s)
            sys.stdout.flush()
    from ..reasoning import REQUEST_THINK

    history: list[dict] = []
    think: bool | None = None
    write(CHAT_HELP + "\n")
    while True:
        try:
            line = read(">>> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return history
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return history
        if text == "/reset":
            history = []
            write("(chat forgotten)\n")
            continue
        if text == "/system" or text.startswith("/system "):
            system = text[len("/system"):].strip() or None
            write(f"(system prompt {'set' if system else 'cleared'})\n")
            continue
        if text.startswith("/think"):
            arg = text[len("/think"):].strip().lower()
            think = {"on": True, "off": False}.get(arg)
            write(f"(thinking {'on' if think else 'off' if think is False else 'as the template defaults'})\n")
            continue
        if text in ("/help", "/?"):
            write(CHAT_HELP + "\n")
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history + [{"role": "user", "content": line}]
        answer: list[str] = []
        thought = False
        token = REQUEST_THINK.set(think)
        try:
            for chunk in llm.create_chat_completion(messages=messages, stream=True, max_tokens=max_tokens, temperature=temperature):
                delta = chunk["choices"][0]["delta"]
                why = delta.get("reasoning_content") or ""
                if why:  # a thinking model's reasoning, shown apart from the answer (not kept in the history)
                    write(("[thinking] " if not thought else "") + why)
                    thought = True
                piece = delta.get("content") or ""
                if piece and thought and not answer:
                    write("\n[answer] ")
                if piece:
                    answer.append(piece)
                    write(piece)
        except KeyboardInterrupt:
            write(" [interrupted]")
        finally:
            REQUEST_THINK.reset(token)
        write("\n")
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": "".join(answer)}]
