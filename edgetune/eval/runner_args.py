"""The eval config as runner arguments: what ``evaluate``, the drift check and the judge all pass
to ``make_runner`` and to generation, kept apart so those modules need not import each other."""

from __future__ import annotations

from ..config import EvalConfig
from .runners import GenParams


def runner_options(cfg: EvalConfig) -> dict:
    """Keyword arguments for ``make_runner`` that come from the eval config."""
    return {"n_ctx": cfg.n_ctx, "dtype": cfg.dtype, "chat_template": cfg.chat_template}


def gen_params(cfg: EvalConfig, max_tokens: int | None = None) -> GenParams:
    """Generation settings from the eval config (``max_tokens`` overrides ``cfg.max_tokens``)."""
    return GenParams(max_tokens=max_tokens or cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                     top_k=cfg.top_k, stop=list(cfg.stop), seed=cfg.seed)
