"""`edgetune serve` and `edgetune chat`: a GGUF over an OpenAI-compatible API, or in the terminal."""

from __future__ import annotations

from pathlib import Path

import click

_model_arg = click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
_adapter_opt = click.option("--adapter", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                            help="LoRA adapter GGUF applied on top of MODEL.")
_ctx_opt = click.option("--n-ctx", type=int, default=None, help="Context window in tokens (default 4096).")
_threads_opt = click.option("--threads", type=int, default=None, help="CPU threads (default: half the cores).")


@click.command("serve")
@_model_arg
@_adapter_opt
@click.option("--host", default=None, help="Address to bind (default 127.0.0.1: this machine only).")
@click.option("--port", type=int, default=None, help="Port (default 8080).")
@click.option("--api-key", envvar="EDGETUNE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every request (or set EDGETUNE_API_KEY).")
@click.option("--alias", default=None, help="Model id reported by /v1/models (default: the file name).")
@_ctx_opt
@_threads_opt
def serve(model, adapter, host, port, api_key, alias, n_ctx, threads):
    """Serve MODEL.gguf over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models).

    The chat template is the one stored in the GGUF.
    """
    from ..console import console
    from ..serve import DEFAULT_HOST, DEFAULT_N_CTX, DEFAULT_PORT, is_loopback
    from ..serve import serve as run_server

    host = host or DEFAULT_HOST
    port = port or DEFAULT_PORT
    if not is_loopback(host) and not api_key:
        console.print(f"[bold yellow]warning:[/] serving on {host} without --api-key: anyone who can reach this "
                      "machine can use the model.", highlight=False)
    console.print(f"serving {model.name} at http://{host}:{port}/v1" + (" (API key required)" if api_key else ""),
                  highlight=False, soft_wrap=True)
    try:
        run_server(model, adapter=adapter, host=host, port=port, api_key=api_key, n_ctx=n_ctx or DEFAULT_N_CTX,
                   n_threads=threads, alias=alias)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after a clean shutdown
        pass
    console.print("server stopped", highlight=False)


@click.command("chat")
@_model_arg
@_adapter_opt
@click.option("--system", default=None, help="System prompt (change it in the chat with /system TEXT).")
@click.option("--max-tokens", type=int, default=512, show_default=True)
@click.option("--temperature", type=float, default=0.7, show_default=True)
@_ctx_opt
@_threads_opt
def chat(model, adapter, system, max_tokens, temperature, n_ctx, threads):
    """Chat with MODEL.gguf in the terminal (/system, /reset, /exit)."""
    from ..serve import DEFAULT_N_CTX, chat_loop, load_llm

    llm = load_llm(model, adapter=adapter, n_ctx=n_ctx or DEFAULT_N_CTX, n_threads=threads)
    chat_loop(llm, system=system, max_tokens=max_tokens, temperature=temperature)
