"""Evaluation: several models side by side on the same examples, quantization drift, CI gates.

Library API::

    from edgetune.eval import evaluate, make_runner
    report = evaluate("test.jsonl", ["base=hf:models/base/x", "tuned=hf:runs/r/fused"], "runs/r/eval", EvalConfig())
"""

from __future__ import annotations

from .core import evaluate
from .runners import make_runner

__all__ = ["evaluate", "make_runner"]
