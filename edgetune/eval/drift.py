"""Quantization drift: per-token KL divergence and top-1 agreement, teacher-forced over references.

Both models read the *same token ids* (the reference model's tokenization of prompt + reference
answer) and are compared at every reference-answer position. Examples go in chunks whose logits fit
:data:`LOGIT_BUDGET`; an hf reference computes each chunk in one pass streamed block by block in
fp32 (:mod:`edgetune.streaming`), so no model is ever held whole in fp32. The comparison itself is
:func:`edgetune.export.verify.drift` — the same function the export stage uses to verify a
GGUF — so "drift" means one thing across edgetune.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import EvalConfig
from ..console import progress
from ..errors import EdgetuneError
from .data import Example
from .runner_args import runner_options
from .runners import Runner, Spec, logit_kinds, make_runner, parse_spec

LOGIT_BUDGET = 512 * 2**20  # bytes of fp32 logits held at once (reference + candidate)


def drift_pair(reference: Runner, candidate: Runner, examples: list[Example], label: str) -> dict[str, Any]:
    """KL(reference || candidate) and top-1 agreement over every reference-answer token."""
    from .divergence import combine, drift

    for r in (reference, candidate):
        if not r.supports_logits:
            raise EdgetuneError(f"{r.spec}: the {r.kind} runner has no logits, so drift cannot be measured.",
                                fix=f"compare runners with logits: {', '.join(logit_kinds())}")
    rows = []
    per_example = []
    todo = []
    for ex in examples:
        ids, n_prompt = reference.encode(ex.messages, ex.reference)
        if len(ids) > n_prompt:
            todo.append((ex, ids, slice(n_prompt - 1, len(ids) - 1)))
    with progress() as bar:
        task = bar.add_task(f"drift {label}", total=len(examples))
        bar.advance(task, len(examples) - len(todo))
        for chunk in _chunks(todo, reference):
            seqs = [(ids, keep) for _, ids, keep in chunk]
            # one call per chunk and model: an hf reference streams its blocks once per chunk
            for (ex, _, _), lr, lc in zip(chunk, reference.logits_many(seqs), candidate.logits_many(seqs), strict=True):
                # HF checkpoints often pad the output layer past the tokenizer; compare the shared ids
                v = min(lr.shape[-1], lc.shape[-1])
                row = drift(np.asarray(lr[:, :v]), np.asarray(lc[:, :v]), ex.id)
                rows.append(row)
                per_example.append({"id": ex.id, "tokens": row.positions, "kl": row.mean_kl, "top1": row.top1})
                bar.advance(task)
    if not rows:
        raise EdgetuneError("No reference tokens to compare (empty references?).")
    total = combine(rows, label)
    kls = sorted(p["kl"] for p in per_example)
    return {
        "reference": reference.spec, "candidate": candidate.spec, "tokens": total.positions,
        "kl": total.mean_kl, "top1_agreement": total.top1, "max_abs_logit_diff": total.max_abs,
        "kl_p95_example": float(np.percentile(kls, 95)), "examples": per_example,
    }


def _chunks(todo: list, reference: Runner):
    """Examples grouped so that one chunk's reference-answer logits (fp32, both models) stay under
    :data:`LOGIT_BUDGET`."""
    from ..streaming import budget_groups

    vocab = reference.vocab_size or 256_000  # unknown: assume a large vocabulary
    return budget_groups(todo, lambda item: item[2].stop - item[2].start, LOGIT_BUDGET / (2 * 4 * vocab))


def run_drift(reference_spec: str, candidate_specs: list[str], examples: list[Example], cfg: EvalConfig | None = None) -> dict:
    """Load the reference once and compare each candidate to it (one candidate in memory at a time)."""
    cfg = cfg or EvalConfig()
    opts = runner_options(cfg)
    ref_spec = parse_spec(reference_spec)
    ref = make_runner(ref_spec, **opts)
    out: dict[str, Any] = {"reference": ref_spec.name, "candidates": {}}
    try:
        for cs in candidate_specs:
            spec = parse_spec(cs)
            cand = make_runner(spec, **opts)
            try:
                out["candidates"][spec.name] = drift_pair(ref, cand, examples, spec.name)
            finally:
                cand.close()
    finally:
        ref.close()
    return out


def drift_many(specs: list[Spec], reference_name: str, examples: list[Example], cfg: EvalConfig) -> dict:
    """Drift of every evaluated model with logits against the one named ``reference_name``."""
    ref = next((s for s in specs if reference_name in (s.name, s.raw)), None)
    if ref is None:
        raise EdgetuneError(f"drift reference {reference_name!r} is not one of the evaluated models.",
                            fix=f"use one of: {', '.join(s.name for s in specs)}")
    cands = [s.raw for s in specs if s is not ref and s.kind in logit_kinds()]
    return run_drift(ref.raw, cands, examples, cfg)
