"""Importance matrix (llama.cpp "imatrix") computed from the user's own data with the HF model.

llama.cpp's definition (tools/imatrix/imatrix.cpp, ``collect_imatrix``): for every weight matrix
that a matrix multiplication reads, and every token that passes through it, add the square of each
input column's activation (``in_sum2``) and count the token (``counts``); the quantizer weighs the
rounding error of column j by ``in_sum2[j] / counts``. llama-imatrix collects the ``blk.*``
matrices only (``output.weight`` needs --process-output), so do we.

Hand-written because llama-imatrix is a C++ binary that a pip install of llama-cpp-python does not
ship, and because we want the calibration text to be the training split rendered through the chat
template the model will serve with: forward hooks on every ``nn.Linear`` of the HF model, run one
decoder block at a time in fp32 (:mod:`edgetune.streaming`, never the whole model in memory; inputs
are the same vectors llama.cpp multiplies: the q/k row permutation of the converter touches output
rows, not input columns), padded positions excluded, names mapped to GGUF names by the
converter's table (:func:`edgetune.arch.gguf_names`). Written in llama.cpp's current imatrix GGUF format
(``<name>.in_sum2``, ``<name>.counts``, ``<name>.in_sum``; ``general.type = imatrix``,
``imatrix.datasets``, ``imatrix.chunk_count``, ``imatrix.chunk_size``); read back by
:func:`edgetune.quant.quantize.load_imatrix`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EdgetuneError
from ..io import atomic_path, sha256_file, write_json

CHUNK_SIZE = 512  # tokens per sequence at most (llama-imatrix's default n_ctx); longer texts are cut
MAX_TOKENS = 100_000  # calibration budget: llama.cpp's guides use ~100 chunks of 512 tokens
BATCH_TOKENS = 4096  # padded tokens per forward pass: memory = one fp32 block plus one batch


@dataclass
class Imatrix:
    sum2: dict[str, np.ndarray]  # GGUF weight name -> sum over tokens of x_j^2 (float64)
    sums: dict[str, np.ndarray]  # GGUF weight name -> sum over tokens of x_j (llama.cpp's in_sum)
    counts: dict[str, int]  # GGUF weight name -> tokens seen
    n_tokens: int = 0
    n_texts: int = 0
    chunk_size: int = CHUNK_SIZE
    datasets: list[str] = field(default_factory=list)

    def importance(self) -> dict[str, np.ndarray]:
        """What the quantizer reads: the mean squared activation of each input column."""
        return {k: (v / max(self.counts[k], 1)).astype(np.float32) for k, v in self.sum2.items()}


# --------------------------------------------------------------------------------------------
# calibration text


def _row_text(obj, tokenizer, where: str) -> str:
    from ..data.formats import normalise
    from ..data.template import _render

    rec = normalise(obj)
    if rec.kind == "text":
        return rec.text or ""
    msgs = rec.messages
    if rec.kind == "preference":  # the answer the model is trained towards
        msgs = msgs + (rec.chosen if isinstance(rec.chosen, list) else [{"role": "assistant", "content": rec.chosen}])
    try:
        return _render(tokenizer, msgs, False, rec.tools)
    except EdgetuneError as exc:
        raise EdgetuneError(exc.message, where=where, fix=exc.fix) from None


def calibration_texts(path, tokenizer) -> list[str]:
    """Texts of a calibration file: JSONL rows in any training format (rendered through the chat
    template, prompts and answers), or a plain-text file (split at blank lines)."""
    p = Path(path)
    if not p.is_file():
        raise EdgetuneError(f"Calibration data not found: {p}", where=str(p),
                            fix="pass a JSONL file (e.g. RUN/data/train.jsonl) or a .txt file")
    if p.suffix not in (".jsonl", ".json"):
        parts = [t.strip() for t in p.read_text(encoding="utf-8").split("\n\n")]
        return [t for t in parts if t]
    texts = []
    with open(p, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EdgetuneError(f"Invalid JSON ({exc.msg}).", where=f"{p}:{i}", fix="one JSON object per line") from None
            texts.append(_row_text(obj, tokenizer, f"{p}:{i}"))
    if not texts:
        raise EdgetuneError(f"{p} holds no calibration rows.", where=str(p), fix="point at a non-empty split")
    return texts


# --------------------------------------------------------------------------------------------
# computing


def gguf_weight_names(model, model_dir) -> dict[str, str]:
    """HF module name -> GGUF weight name, for the ``nn.Linear`` layers llama.cpp would collect."""
    import torch

    from ..arch import gguf_names
    from .gguf import gguf_arch_for

    cfg, arch = gguf_arch_for(model_dir)
    names = gguf_names(arch, cfg)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            g = names(name + ".weight")
            if g and g.startswith("blk."):
                out[name] = g
    return out


def _batches(ids: list[list[int]], batch_tokens: int):
    """Sequences sorted by length, grouped so that rows x longest stays under ``batch_tokens``."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batch: list[list[int]] = []
    for i in order:
        if batch and (len(batch) + 1) * len(ids[i]) > batch_tokens:
            yield batch
            batch = []
        batch.append(ids[i])
    if batch:
        yield batch


def compute_imatrix(model_dir, texts: list[str], *, chunk_size: int = CHUNK_SIZE, max_tokens: int = MAX_TOKENS,
                    batch_tokens: int = BATCH_TOKENS, show_progress: bool = True, datasets: list[str] | None = None) -> Imatrix:
    """Run the HF model over ``texts`` (tokenized as the model sees them, each cut at ``chunk_size``
    tokens, at most ``max_tokens`` in all) and collect llama.cpp's importance statistics."""
    import torch
    from transformers import AutoTokenizer

    from ..console import console

    model_dir = Path(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    ids, total = [], 0
    for t in texts:
        x = tok(t).input_ids[:chunk_size]
        if not x:
            continue
        x = x[: max_tokens - total]
        if not x:
            break
        ids.append(x)
        total += len(x)
    if not ids:
        raise EdgetuneError("The calibration data produced no tokens.", fix="pass a non-empty JSONL or text file")
    from ..streaming import StreamedModel, Unit

    sm = StreamedModel(model_dir)  # one decoder block in fp32 at a time, never the whole model
    names = gguf_weight_names(sm.model, model_dir)
    if not names:
        raise EdgetuneError(f"No weight of {model_dir} maps to a GGUF block tensor.", where=str(model_dir))
    im = Imatrix({}, {}, {}, chunk_size=chunk_size, datasets=list(datasets or []))
    mask: dict[str, torch.Tensor] = {}

    def hook(gname):
        def fn(_mod, args):
            x = args[0][mask["m"]].double()  # [real tokens, in_features]: padding excluded
            s2 = (x * x).sum(0).numpy()
            s1 = x.sum(0).numpy()
            if gname in im.sum2:
                im.sum2[gname] += s2
                im.sums[gname] += s1
                im.counts[gname] += x.shape[0]
            else:
                im.sum2[gname], im.sums[gname], im.counts[gname] = s2, s1, x.shape[0]
        return fn

    mods = dict(sm.model.named_modules())
    handles = [mods[n].register_forward_pre_hook(hook(g)) for n, g in names.items()]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    units = []
    for batch in _batches(ids, batch_tokens):
        n = max(len(b) for b in batch)
        # right padding: causal rows unaffected; the mask keeps padded positions out of the sums
        units.append(Unit(torch.tensor([b + [pad] * (n - len(b)) for b in batch]),
                          torch.tensor([[1] * len(b) + [0] * (n - len(b)) for b in batch])))
    try:
        from rich.progress import Progress

        with Progress(console=console, disable=not show_progress, transient=True) as prog:
            task = prog.add_task("imatrix", total=total * len(sm.layers))
            # the layer loop is outermost: each unit enters each block once, so sums add up per
            # block in the same batch order as a whole-model pass (bit-identical float64 sums)
            for _ in sm.run(units, logits=False, on_unit=lambda u: (mask.__setitem__("m", u.mask.bool()),
                                                                      prog.advance(task, int(u.mask.sum())))):
                pass
    finally:
        for h in handles:
            h.remove()
    im.n_tokens, im.n_texts = total, len(ids)
    return im


# --------------------------------------------------------------------------------------------
# llama.cpp's imatrix GGUF format


def write_imatrix(im: Imatrix, path, extra: dict | None = None) -> Path:
    """Write ``im`` in llama-imatrix's GGUF layout (atomically); ``extra`` strings/ints go to
    ``edgetune.imatrix.*`` metadata (which data, how many tokens)."""
    import gguf

    path = Path(path)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), "imatrix")
        w.kv_data[0].pop("general.architecture", None)  # llama-imatrix writes none
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", im.datasets or ["unknown"])
        w.add_uint32("imatrix.chunk_count", max(1, -(-im.n_tokens // im.chunk_size)))
        w.add_uint32("imatrix.chunk_size", im.chunk_size)
        w.add_uint64("edgetune.imatrix.tokens", im.n_tokens)
        w.add_uint32("edgetune.imatrix.texts", im.n_texts)
        for k, v in (extra or {}).items():
            (w.add_uint64 if isinstance(v, int) else w.add_string)(f"edgetune.imatrix.{k}", v if isinstance(v, int) else str(v))
        for name in sorted(im.sum2):  # ne = (columns, 1): one matrix per dense tensor
            w.add_tensor(f"{name}.in_sum", im.sums[name].astype(np.float32).reshape(1, -1))
            w.add_tensor(f"{name}.in_sum2", im.sum2[name].astype(np.float32).reshape(1, -1))
            w.add_tensor(f"{name}.counts", np.array([[float(im.counts[name])]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def make_imatrix(model_dir, calib, out_path, *, max_tokens: int = MAX_TOKENS, chunk_size: int = CHUNK_SIZE,
                 show_progress: bool = True) -> dict:
    """``edgetune export imatrix``: calibration file -> imatrix GGUF + a JSON record beside it
    (which data, its hash, how many texts and tokens). Returns the record."""
    from ..data.template import load_tokenizer

    calib = Path(calib)
    tokenizer = load_tokenizer(model_dir) if calib.suffix in (".jsonl", ".json") else None  # chats need the template
    texts = calibration_texts(calib, tokenizer)
    im = compute_imatrix(model_dir, texts, chunk_size=chunk_size, max_tokens=max_tokens, show_progress=show_progress,
                         datasets=[str(calib)])
    data_hash = sha256_file(calib)
    out = write_imatrix(im, out_path, {"data_sha256": data_hash, "model": str(Path(model_dir).resolve())})
    record = {"imatrix": str(out), "data": str(calib), "data_sha256": data_hash, "texts": im.n_texts,
              "tokens": im.n_tokens, "tensors": len(im.sum2), "chunk_size": chunk_size, "max_tokens": max_tokens}
    write_json(out.with_suffix(".json"), record)
    return record
