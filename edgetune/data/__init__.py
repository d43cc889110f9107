"""Data preparation: formats -> messages, cleaning/PII, dedup, split + leakage, chat template + masks.

Public entry points (imported lazily so ``import edgetune.data`` stays cheap):

- :func:`prepare` (path, out_dir, cfg, model_dir) -> the data card (dict)
- :func:`validate` (path, cfg, model_dir) -> :class:`ValidationReport` (``exit_code`` 0/1/2)
- :func:`load_tokenizer`, :func:`encode_example`, :func:`render_prompt` (``edgetune.data.template``)
- :func:`dominant_system_prompt` (``edgetune.data.stats``)
"""

from __future__ import annotations

_LAZY = {
    "prepare": "preparation",
    "validate": "preparation",
    "ValidationReport": "preparation",
    "load_tokenizer": "template",
    "encode_example": "template",
    "render_prompt": "template",
    "Encoded": "template",
    "dominant_system_prompt": "stats",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
