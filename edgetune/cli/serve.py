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
@click.argument("model", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_adapter_opt
@click.option("--config", "team_config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Team server YAML: bases, LoRA adapters, routes, limits, log (see README).")
@click.option("--lora", "loras", multiple=True, metavar="NAME=FILE",
              help="Serve LoRA adapter FILE as model id NAME on the one loaded MODEL (repeatable).")
@click.option("--split", "splits", multiple=True, metavar="ROUTE=ID:W,ID:W", help="A/B route: weights, sticky per `user`.")
@click.option("--shadow", "shadows", multiple=True, metavar="ROUTE=PRIMARY:CANDIDATE",
              help="Shadow route: answer from PRIMARY, mirror to CANDIDATE, log both.")
@click.option("--parallel", type=click.IntRange(1, 64), default=None,
              help="Team server: requests decoded together per base (continuous batching; default 8, 1 = one at a time).")
@click.option("--prefix-cache/--no-prefix-cache", default=None,
              help="Team server: reuse the KV of a prompt prefix an earlier request computed (default on).")
@click.option("--flash-attn/--no-flash-attn", default=None,
              help="Team server: llama.cpp's flash attention (default: on when --parallel > 1, off for 1).")
@click.option("--queue-depth", type=int, default=None, help="Requests that may wait per base (default 8); more get 503.")
@click.option("--queue-timeout", type=float, default=None, help="Seconds a request may wait for its turn (default 30).")
@click.option("--memory-cap-mb", type=float, default=None, help="Unload least recently used bases above this (default: no cap).")
@click.option("--shadow-log", type=click.Path(dir_okay=False, path_type=Path), default=None, help="JSONL log of shadow / A/B traffic.")
@click.option("--log-text/--no-log-text", default=None, help="Write prompts to the logs (default off: private deployments).")
@click.option("--host", default=None, help="Address to bind (default 127.0.0.1: this machine only).")
@click.option("--port", type=int, default=None, help="Port (default 8080).")
@click.option("--api-key", envvar="EDGETUNE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every request (or set EDGETUNE_API_KEY).")
@click.option("--alias", default=None, help="Model id reported by /v1/models (default: the file name).")
@_ctx_opt
@_threads_opt
def serve(model, adapter, team_config, loras, splits, shadows, parallel, prefix_cache, flash_attn, queue_depth, queue_timeout, memory_cap_mb, shadow_log,
          log_text, host, port, api_key, alias, n_ctx, threads):
    """Serve MODEL.gguf over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models).

    With --config, --lora or --parallel: the team server — several LoRA adapters on one loaded base,
    concurrent requests decoded together (continuous batching), A/B and shadow routes, bounded queues
    (503 + Retry-After), /health and /metrics.
    The chat template is the one stored in the GGUF.
    """
    from ..console import console
    from ..errors import EdgetuneError
    from ..serve import DEFAULT_HOST, DEFAULT_N_CTX, DEFAULT_PORT, is_loopback

    host = host or DEFAULT_HOST
    port = port or DEFAULT_PORT
    team = bool(team_config or loras or splits or shadows or parallel)
    if not team and model is None:
        raise EdgetuneError("No model to serve.", fix="edgetune serve MODEL.gguf   or   edgetune serve --config team.yaml")
    if flash_attn is not None and not team:
        raise EdgetuneError("--flash-attn is a team-server option; MODEL.gguf alone is served without it.",
                            fix="edgetune serve MODEL.gguf --parallel 1 --flash-attn   (the team server, one request at a time)")
    if team and adapter:
        raise EdgetuneError("--adapter is for a single model; name adapters with --lora NAME=FILE here.", fix="--lora NAME=FILE")
    if not is_loopback(host) and not api_key:
        console.print(f"[bold yellow]warning:[/] serving on {host} without --api-key: anyone who can reach this "
                      "machine can use the model.", highlight=False)
    try:
        if team:
            _serve_team(model, team_config, loras, splits, shadows, alias, n_ctx, threads, host, port, api_key, parallel, prefix_cache,
                        flash_attn, queue_depth=queue_depth, queue_timeout=queue_timeout, memory_cap_mb=memory_cap_mb,
                        shadow_log=shadow_log, log_text=log_text)
        else:
            from ..serve import serve as run_server

            console.print(f"serving {model.name} at http://{host}:{port}/v1" + (" (API key required)" if api_key else ""),
                          highlight=False, soft_wrap=True)
            run_server(model, adapter=adapter, host=host, port=port, api_key=api_key, n_ctx=n_ctx or DEFAULT_N_CTX,
                       n_threads=threads, alias=alias)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after a clean shutdown
        pass
    console.print("server stopped", highlight=False)


def _serve_team(model, team_config, loras, splits, shadows, alias, n_ctx, threads, host, port, api_key, parallel, prefix_cache,
                flash_attn, **limits):
    import logging

    from ..console import console
    from ..serve.team import make_team_server
    from ..serve.team_config import from_flags, load_team_config

    if team_config:
        cfg = load_team_config(team_config)
        for k, v in limits.items():  # flags override the file
            if v is not None:
                setattr(cfg, k, v)
    else:
        cfg = from_flags(model, alias=alias, loras=loras, splits=splits, shadows=shadows, n_ctx=n_ctx or 2048, **limits)
    for b in cfg.bases.values():  # the batching flags override every base, from a file or from flags
        b.parallel = parallel or b.parallel
        b.prefix_cache = b.prefix_cache if prefix_cache is None else prefix_cache
        b.flash_attn = b.flash_attn if flash_attn is None else flash_attn
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ids = cfg.model_ids() + list(cfg.routes)
    console.print(f"serving {', '.join(ids)} at http://{host}:{port}/v1" + (" (API key required)" if api_key else ""),
                  highlight=False, soft_wrap=True)
    make_team_server(cfg, host=host, port=port, api_key=api_key, n_threads=threads, log_level="info").server.run()


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
