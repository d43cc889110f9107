"""The adapter route: ship the trained LoRA adapter on the unmodified source GGUF the model was imported from.

A base imported with ``edgetune models import`` (a GGUF file or an Ollama model) records its source in
``import.json``. With ``export.route: adapter`` the run does not merge and requantize: it writes the
adapter as a GGUF LoRA, checks that llama.cpp running the *source* GGUF with that adapter computes
what the imported HF model with the PEFT adapter computes (teacher-forced on held-out rows: top-1
agreement and mean KL, thresholds below), and the Modelfile says ``FROM <the same Ollama name or the
source file>`` + ``ADAPTER <the adapter>``: the weights served are the ones trained against.

Thresholds: both sides hold the same de-quantized weights (the HF folder rounds them to bf16) and the
same adapter (f16 in the GGUF); what differs is the numeric path (llama.cpp multiplies quantized
blocks against 8-bit-quantized activations, HF computes in fp32). The check also reports the same
comparison without the adapter, so a drift the adapter adds stands out from the import's own.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgetuneError
from ..model_dir import Source, read_source

MIN_TOP1 = 0.90  # teacher-forced argmax agreement, source GGUF + adapter vs imported HF + adapter
MAX_KL = 0.05  # mean KL(HF || llama.cpp) in nats over the compared positions
ROWS = 8  # held-out rows compared


def require_source(model_dir) -> Source:
    """The import record, checked: the source file is still there (the adapter route ships on it)."""
    src = read_source(model_dir)
    if src is None:
        raise EdgetuneError(
            f"export.route = adapter ships the adapter on the GGUF the base was imported from, but {model_dir} "
            "was not imported (no import.json).",
            where=str(model_dir),
            fix="import the base with `edgetune models import FILE.gguf` (or ollama:NAME) and train on that, "
                "or use export.route: merge")
    if not src.path.is_file():
        raise EdgetuneError(f"The source GGUF of {model_dir} is gone: {src.path}.", where=str(src.path),
                            fix="restore the file (or pull the Ollama model again), or use export.route: merge")
    return src


def heldout_token_lists(tokenizer, rows_path: Path, n: int = ROWS) -> list[list[int]]:
    """Token ids of up to ``n`` held-out conversations rendered as training saw them (prompt + answer)."""
    from ..data.template import encode_example
    from ..train.batching import read_jsonl

    lists = []
    for row in read_jsonl(rows_path)[:n]:
        try:
            lists.append(list(encode_example(tokenizer, row).input_ids))
        except EdgetuneError:
            continue
    if not lists:
        raise EdgetuneError(f"No held-out row of {rows_path} could be rendered for the adapter check.",
                            where=str(rows_path))
    return lists


def verify_on_source(imported_dir, adapter_dir, source_gguf, adapter_gguf, token_lists) -> dict:
    """llama.cpp on the source GGUF (+ the adapter GGUF) vs the imported HF model (+ the PEFT adapter),
    fp32 streamed, teacher-forced on ``token_lists``. Returns both comparisons; raises when the
    adapter one is outside the thresholds."""
    from ..eval.divergence import combine, drift
    from ..llamacpp import gguf_logits, load_llama
    from ..streaming import logits

    rows = {}
    for label, lora, adapter in (("source vs imported", None, None),
                                 ("source+adapter vs imported+adapter", adapter_gguf, adapter_dir)):
        ref = logits(imported_dir, token_lists, adapter=adapter)
        llm = load_llama(source_gguf, lora_path=str(lora) if lora else None, n_ctx=max(512, max(map(len, token_lists)) + 8))
        try:
            test = gguf_logits(llm, token_lists)
        finally:
            llm.close()
        rows[label] = combine([drift(r, t, label) for r, t in zip(ref, test, strict=True)], label)
    row = rows["source+adapter vs imported+adapter"]
    out = {k: {"top1": round(r.top1, 4), "mean_kl": round(r.mean_kl, 5), "positions": r.positions}
           for k, r in rows.items()}
    out["thresholds"] = {"min_top1": MIN_TOP1, "max_kl": MAX_KL}
    out["passed"] = row.top1 >= MIN_TOP1 and row.mean_kl <= MAX_KL
    if not out["passed"]:
        base = rows["source vs imported"]
        raise EdgetuneError(
            f"The adapter on the source GGUF does not compute what it computed in training: top-1 {row.top1:.1%} "
            f"(need >= {MIN_TOP1:.0%}), mean KL {row.mean_kl:.4f} (need <= {MAX_KL}) over {row.positions} positions "
            f"(without the adapter: top-1 {base.top1:.1%}, KL {base.mean_kl:.4f}).",
            where=str(adapter_gguf),
            fix="check the base was imported from this very file (import.json sha256); or ship with export.route: merge")
    return out
