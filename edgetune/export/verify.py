"""Does the GGUF compute what the HF model computes? Tokenizer identity + logit drift, in numbers.

Two checks, both on a fixed, varied corpus (:data:`PROMPTS`: unicode, code, whitespace runs,
digits, special tokens, a rendered chat):

* **tokenizer**: llama.cpp's tokenizer (from the GGUF metadata) gives the same ids as the HF
  tokenizer, with and without BOS/EOS, special tokens parsed; the GGUF chat template is the HF one.
* **logits**: next-token logits at every position. :func:`~edgetune.eval.divergence.drift` returns top-1 agreement, mean KL
  divergence and max |Δlogit|; :func:`~edgetune.eval.divergence.drift_table` prints them. f32/f16/bf16 exports must agree
  (top-1 100% outside near-ties, small max |Δlogit|): a disagreement is a converter bug. Quantized
  exports are reported against the f16 export.

Reference logits come from transformers (torch) when it is installed, streamed block by block in
fp32 (:mod:`edgetune.streaming`: never the whole model in memory); on a torch-less machine
(e.g. a Mac with only ``[mlx]``) the tokenizer check still runs and the logit check is skipped
with a note.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EdgetuneError, MissingDependencyError
from ..eval.divergence import DriftRow, combine, drift, drift_table
from ..llamacpp import gguf_logits, load_llama
from ..qtypes import QTYPES

PROMPTS: list[str] = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Héllo wörld — naïve café, 東京, Здравствуйте, 🤖🚀 emoji!",
    "Numbers: 3.14159, 2024-11-23, 1,000,000 and x=42;y=-7",
    "   leading spaces,\ttabs\t\tand\n\n\nblank lines   \n  ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "JSON: {\"name\": \"edgetune\", \"ok\": true, \"list\": [1, 2, 3]}",
]
CHAT = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Summarise: llamas are camelids from South America."},
    {"role": "assistant", "content": "Llamas are South American camelids."},
    {"role": "user", "content": "And alpacas?"},
]

# f32/f16/bf16 against HF float32: the verify_tolerance / near_tie columns of edgetune.qtypes
REL_TOLERANCE = {q.name: q.verify_tolerance for q in QTYPES.values() if q.verify_tolerance is not None}
REL_NEAR_TIE = {q.name: q.near_tie for q in QTYPES.values() if q.verify_tolerance is not None}


@dataclass
class VerifyReport:
    gguf: str
    outtype: str
    tokenizer_ok: bool = True
    tokenizer_mismatches: list[str] = field(default_factory=list)
    template_ok: bool | None = None
    rows: list[DriftRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tolerance: float | None = None

    @property
    def passed(self) -> bool:
        if not self.tokenizer_ok or self.template_ok is False:
            return False
        if self.tolerance is None:
            return True
        return all(r.max_abs <= self.tolerance and r.flips_outside_ties == 0 for r in self.rows)

    def table(self):
        return drift_table(self.rows, title=f"{Path(self.gguf).name} vs reference")

    def summary(self) -> str:
        tok = "identical" if self.tokenizer_ok else f"{len(self.tokenizer_mismatches)} mismatch(es)"
        tpl = {None: "n/a", True: "identical", False: "DIFFERS"}[self.template_ok]
        return f"tokenizer: {tok}; chat template: {tpl}"

    def raise_if_failed(self, path) -> None:
        if self.passed:
            return
        detail = "; ".join(self.tokenizer_mismatches[:3])
        if self.template_ok is False:
            detail += " chat template in the GGUF differs from the HF one;"
        for r in self.rows:
            if self.tolerance is not None and (r.max_abs > self.tolerance or r.flips_outside_ties):
                detail += f" {r.label}: top-1 {r.top1:.1%}, max|Δlogit| {r.max_abs:.3f} (> {self.tolerance});"
        raise EdgetuneError(
            f"GGUF verification failed: the {self.outtype} export does not compute what the HF model computes. {detail}",
            where=str(path),
            fix="this is a converter bug for this architecture; please report it (use --no-verify to keep the file anyway)",
        )


def hf_logits(model_dir, token_lists: list[list[int]]) -> list[np.ndarray]:
    """The HF model's fp32 logits, streamed one decoder block at a time (:mod:`edgetune.streaming`):
    bit-identical to a whole-model fp32 forward, in the memory of one block."""
    from ..streaming import logits

    return logits(model_dir, token_lists)


def corpus_token_lists(tokenizer) -> list[list[int]]:
    """Token ids of the corpus as the HF tokenizer gives them (incl. BOS when it adds one)."""
    texts = list(PROMPTS)
    if getattr(tokenizer, "chat_template", None):
        texts.append(tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True))
    return [tokenizer(t).input_ids for t in texts]


def check_tokenizer(tokenizer, llm, report: VerifyReport) -> None:
    texts = list(PROMPTS)
    hf_template = getattr(tokenizer, "chat_template", None)
    if hf_template:
        texts.append(tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True))
    for t in texts:
        for add in (False, True):
            hf_ids = tokenizer(t, add_special_tokens=add).input_ids
            gg_ids = llm.tokenize(t.encode("utf-8"), add_bos=add, special=True)
            if hf_ids != gg_ids:
                report.tokenizer_ok = False
                report.tokenizer_mismatches.append(f"{t[:30]!r} (special={add}): HF {hf_ids[:12]} vs GGUF {gg_ids[:12]}")
    from gguf import Keys

    gg_template = llm.metadata.get(Keys.Tokenizer.CHAT_TEMPLATE)
    if hf_template or gg_template:
        report.template_ok = hf_template == gg_template


def verify_gguf(model_dir, gguf_path, *, outtype: str | None = None) -> VerifyReport:
    """Verify an unquantized GGUF against its HF folder (tokenizer + logits)."""
    from transformers import AutoTokenizer

    if outtype is None:
        outtype = gguf_outtype(gguf_path)
    report = VerifyReport(gguf=str(gguf_path), outtype=outtype)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    llm = load_llama(gguf_path)
    try:
        check_tokenizer(tok, llm, report)
        lists = corpus_token_lists(tok)
        try:
            ref = hf_logits(model_dir, lists)
        except MissingDependencyError:
            report.notes.append("torch is not installed: logit check skipped (tokenizer checked)")
            report.tolerance = None
            return report
        test = gguf_logits(llm, lists)
    finally:
        llm.close()
    spread = float(np.mean([r.std() for r in ref]))
    if outtype in REL_TOLERANCE:  # quantized types (q8_0 written directly) are reported, not gated
        report.tolerance = max(1e-3, REL_TOLERANCE[outtype] * spread)
    tie = REL_NEAR_TIE.get(outtype, 0.0) * spread
    rows = [drift(r, t, f"p{i}", tie) for i, (r, t) in enumerate(zip(ref, test, strict=False))]
    report.rows = [combine(rows, f"{outtype} vs HF")]
    return report


def compare_ggufs(ref_gguf, test_ggufs: dict[str, Path], token_lists: list[list[int]], *, ref_lora=None, lora: dict | None = None) -> list[DriftRow]:
    """Drift of several GGUFs (e.g. quantized ones, or base + adapter) against a reference GGUF."""
    llm = load_llama(ref_gguf, lora_path=ref_lora)
    try:
        ref = gguf_logits(llm, token_lists)
    finally:
        llm.close()
    rows = []
    for label, path in test_ggufs.items():
        llm = load_llama(path, lora_path=(lora or {}).get(label))
        try:
            test = gguf_logits(llm, token_lists)
        finally:
            llm.close()
        rows.append(combine([drift(r, t, label) for r, t in zip(ref, test, strict=False)], label))
    return rows


def gguf_outtype(path) -> str:
    """The dominant weight type of a GGUF file ("f16", "q4_k", ...), from its tensor infos."""
    from .gguf_info import read_tensor_infos

    counts: dict[str, int] = {}
    for t in read_tensor_infos(path):
        if len(t.shape) >= 2:
            counts[t.type_name] = counts.get(t.type_name, 0) + t.n_elements
    return max(counts, key=counts.get) if counts else "f32"


DEMO_PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time",
]


def greedy(llm, prompt: str, max_tokens: int = 24) -> list[int]:
    llm.reset()
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    out = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if llm.token_eos() == tok or len(out) >= max_tokens:
            break
        out.append(int(tok))
    return out


# base GGUF + adapter GGUF against the fused GGUF: two numeric paths (x·W + B·A·x vs x·(W+BA) in
# f16), so they are compared as distributions, never as greedy strings. Seen on tiny random models
# and the demo model: top-1 >= 0.98, mean KL < 1e-4; a wrong scale or a missing layer gives top-1
# well under 0.9.
ADAPTER_MIN_TOP1 = 0.95
ADAPTER_MAX_KL = 1e-3


@dataclass
class AdapterReport:
    row: DriftRow
    greedy_equal: int  # informational: greedy strings may part at a near-tie on any CPU
    prompts: int
    samples: list[tuple[str, str]] = field(default_factory=list)  # (fused, base+adapter) text

    @property
    def passed(self) -> bool:
        return self.row.top1 >= ADAPTER_MIN_TOP1 and self.row.mean_kl <= ADAPTER_MAX_KL

    def summary(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        return (f"base+adapter vs fused: top-1 {self.row.top1:.1%} (>= {ADAPTER_MIN_TOP1:.0%}), mean KL "
                f"{self.row.mean_kl:.2e} (<= {ADAPTER_MAX_KL:g}) → {verdict}; greedy text identical on "
                f"{self.greedy_equal}/{self.prompts} prompts")


def verify_adapter(base_gguf, adapter_gguf, fused_gguf, prompts: list[str] | None = None, max_tokens: int = 24) -> AdapterReport:
    """Base GGUF + adapter GGUF against the fused GGUF: logit drift and greedy generations."""
    prompts = prompts or DEMO_PROMPTS
    results = {}
    for label, path, lora in (("fused", fused_gguf, None), ("base+adapter", base_gguf, adapter_gguf)):
        llm = load_llama(path, lora_path=lora)
        try:
            lists = [llm.tokenize(p.encode(), add_bos=True, special=True) for p in prompts]
            results[label] = (gguf_logits(llm, lists), [greedy(llm, p, max_tokens) for p in prompts], llm)
            texts = [llm.detokenize(g).decode("utf-8", "replace") for g in results[label][1]]
            results[label] = results[label][:2] + (texts,)
        finally:
            llm.close()
    ref, test = results["fused"][0], results["base+adapter"][0]
    row = combine([drift(r, t, "x") for r, t in zip(ref, test, strict=False)], "base+adapter vs fused")
    eq = sum(a == b for a, b in zip(results["fused"][1], results["base+adapter"][1], strict=False))
    return AdapterReport(row, eq, len(prompts), list(zip(results["fused"][2], results["base+adapter"][2], strict=False)))
