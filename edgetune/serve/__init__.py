"""Serving GGUFs over an OpenAI-compatible HTTP API.

``single``: one GGUF (+ at most one adapter) through llama-cpp-python's own server, and the
terminal chat. ``team``: one process for several bases and many LoRA adapters switched per
request, A/B and shadow routes, bounded queues, metrics (``edgetune serve --config``).
"""

from .single import (
    CHAT_HELP,
    DEFAULT_HOST,
    DEFAULT_N_CTX,
    DEFAULT_PORT,
    LocalServer,
    chat_loop,
    free_port,
    is_loopback,
    load_llm,
    make_app,
    make_server,
    serve,
)

__all__ = ["CHAT_HELP", "DEFAULT_HOST", "DEFAULT_N_CTX", "DEFAULT_PORT", "LocalServer", "chat_loop", "free_port",
           "is_loopback", "load_llm", "make_app", "make_server", "serve"]
