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

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgetuneError

MIN_TOP1 = 0.90  # teacher-forced argmax agreement, source GGUF + adapter vs imported HF + adapter
MAX_KL = 0.05  # mean KL(HF || llama.cpp) in nats over the compared positions
ROWS = 8  # held-out rows compared


@dataclass(frozen=True)
class Source:
    """Where an imported base came from (``import.json``'s ``source``)."""

    kind: str  # gguf | ollama
    path: Path  # the GGUF file (for Ollama: the model blob)
    name: str | None  # the Ollama name, e.g. qwen2.5:0.5b
    sha256: str | None
    file_type: str | None  # the quant type, e.g. Q4_K_M

    @property
    def ollama_name(self) -> str | None:
        """The Ollama name the Modelfile's FROM says (the model the user already runs); None for a file."""
        return self.name if self.kind == "ollama" and self.name else None

    @property
    def from_line(self) -> str:
        """What the Modelfile's FROM says: the Ollama name or the file."""
        return self.ollama_name or str(self.path)


def read_source(model_dir) -> Source | None:
    """The import record of ``model_dir``; None when it was not imported (an HF folder)."""
    p = Path(model_dir) / "import.json"
    if not p.is_file():
        return None
    try:
        src = json.loads(p.read_text(encoding="utf-8"))["source"]
        return Source(src["kind"], Path(src["path"]), src.get("name"), src.get("sha256"), src.get("file_type"))
    except (ValueError, KeyError, TypeError) as exc:
        raise EdgetuneError(f"{p} is not an import record edgetune can read ({exc}).", where=str(p),
                            fix="re-import the model with `edgetune models import SOURCE`") from None


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
    from ..streaming import logits
    from .verify import combine, drift, gguf_logits, load_llama

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
