"""Reference forward passes that never hold the whole model: one decoder block at a time.

Verification (HF vs GGUF logits), the importance matrix and ``eval drift`` need the HF model's fp32
activations or logits. Loading the model in fp32 costs 2x its bf16 size (an 8B model: 32 GB), so
instead :class:`StreamedModel` builds the model's skeleton with no weights (every parameter on the
``meta`` device; buffers such as the rotary frequencies are real), and runs the work *block-major*:

1. a capture pass per unit (one sequence, or one padded batch) runs the model's own ``forward``
   with every decoder layer replaced by a stand-in that records the arguments the model hands it
   (hidden state, masks, rotary embeddings; per layer, so alternating sliding-window layers get
   theirs) and stops before the final norm: the model's own code builds masks and positions;
2. for each decoder layer: its weights are read from the safetensors (widened to fp32, the
   adapter merged in when there is one), every unit is pushed through it, the weights dropped;
3. the final norm, then the output layer in row chunks, only at the positions asked for.

Each layer computes exactly what it computes inside the whole model (same module, same inputs),
so hidden states are bit-identical to a whole-model fp32 forward; only the output layer's chunked
matmul may round differently (≤ 1e-5 relative). Peak memory is one block in fp32, an output-layer
chunk, and the hidden states of the units in flight (grouped under :data:`HIDDEN_BUDGET`; each
group streams the weights once more).

Hand-written glue: accelerate's disk offload streams weights per *call* (one full weight read per
sequence) and keeps fp32 copies of offloaded weights; block-major order reads each weight once per
group and holds one block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import EdgetuneError

RUNTIME_BYTES = 400e6  # torch + transformers + tokenizer imported, before any weight (measured, see estimate_peak)
BLOCK_OVERHEAD = 1.1  # peak of a materialised block over its fp32 bytes (the tensor being widened, allocator)
HEAD_CHUNK_ROWS = 8192  # output-layer rows converted to fp32 at a time
HIDDEN_BUDGET = 256 * 2**20  # fp32 hidden states of the units in one group (bytes)


@dataclass
class Unit:
    """One forward input: ``ids`` [batch, n] (and its attention mask, or None for one unpadded
    sequence); ``keep``: the positions whose logits to return (per row), None for all."""

    ids: object  # torch.LongTensor [B, n]
    mask: object = None  # torch.LongTensor [B, n] or None
    keep: slice | None = None
    h: object = None  # hidden state in flight
    calls: list = field(default_factory=list)  # per layer: (args after the hidden state, kwargs)


class _Captured(Exception):
    pass


def _return_freed_memory() -> None:
    """Make glibc hand large freed blocks back to the system at once.

    glibc raises its mmap threshold to the size of the largest block freed (up to 32 MB), so after
    the first block of weights is dropped, the next ones come from the heap, whose freed pages stay
    with the process: peak memory then grows by part of a block per layer. A fixed 1 MB threshold
    (``mallopt(M_MMAP_THRESHOLD)``) keeps every weight-sized buffer in its own mapping, unmapped
    when freed. Not glibc (macOS, musl): nothing to do.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class StreamedModel:
    """An HF model folder run one decoder block at a time in fp32 (see the module docstring).

    ``adapter``: a PEFT or mlx-lm adapter folder merged into each weight as it is read (fp32, the
    same merge :mod:`edgetune.fuse` does). ``max_resident`` counts the decoder blocks that were
    ever materialised at once (the tests hold it to 1).
    """

    def __init__(self, model_dir, *, adapter=None):
        try:
            import torch
            from accelerate import init_empty_weights
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError:
            from .errors import MissingDependencyError

            raise MissingDependencyError("torch", "torch", "Computing fp32 reference activations") from None
        from .tensors import SafetensorsReader

        _return_freed_memory()
        self.torch = torch
        self.model_dir = Path(model_dir)
        self.reader = SafetensorsReader(self.model_dir)
        config = AutoConfig.from_pretrained(str(self.model_dir), local_files_only=True)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.model = model.eval()
        self.text_config = getattr(config, "text_config", None) or config
        self.decoder = model.get_decoder()
        self.layers = self.decoder.layers
        self.embed = model.get_input_embeddings()
        self.head = model.get_output_embeddings()
        self.norm = self.decoder.norm
        self.names = {id(m): n for n, m in model.named_modules()}
        self.adapter = None
        if adapter:
            from .fuse import load_adapter

            self.adapter = load_adapter(adapter)
        self.resident = 0
        self.max_resident = 0
        self.passes = 0  # how many times the weights were streamed (one per group)

    # ---------------------------------------------------------------- weights

    def _checkpoint_name(self, name: str) -> str:
        if name in self.reader:
            return name
        if self.head is not None and name == self._prefix(self.head) + "weight":  # tied output layer
            tied = self._prefix(self.embed) + "weight"
            if tied in self.reader:
                return tied
        for k in self.reader.names():  # e.g. a multimodal checkpoint's language_model. prefix
            if k.endswith("." + name):
                return k
        raise EdgetuneError(f"{self.model_dir.name} has no weight {name} in its safetensors.", where=str(self.model_dir),
                            fix="the folder's config.json and weights do not belong together: re-save the model")

    def _prefix(self, module) -> str:
        n = self.names[id(module)]
        return n + "." if n else ""

    def _weight(self, name: str) -> np.ndarray:
        """fp32 value of parameter ``name`` (adapter merged)."""
        from .tensors import to_float32

        if self.adapter is not None and name in self.adapter.replaced:
            arr, dt = self.adapter.replaced[name]
            return to_float32(arr, dt)
        w = self.reader.load_f32(self._checkpoint_name(name))
        if self.adapter is not None and name.endswith(".weight"):
            layer = self.adapter.layers.get(name[: -len(".weight")])
            if layer is not None:
                from .fuse import merge_weight

                w = merge_weight(w, layer, str(self.adapter.path))
        return w

    def _materialise(self, module) -> None:
        torch = self.torch
        prefix = self._prefix(module)
        for pname, _ in list(module.named_parameters()):
            _set_param(module, pname, torch.from_numpy(np.ascontiguousarray(self._weight(prefix + pname))))

    def _drop(self, module) -> None:
        torch = self.torch
        for pname, p in list(module.named_parameters()):
            _set_param(module, pname, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    # ---------------------------------------------------------------- pieces of the forward

    def _embed(self, ids):
        """The input embedding module on the rows ``ids`` use (a sub-table, never the whole one)."""
        torch = self.torch
        uniq, inverse = torch.unique(ids, return_inverse=True)
        name = self._checkpoint_name(self._prefix(self.embed) + "weight")
        from .tensors import to_float32

        rows = to_float32(self.reader.take(name, uniq.numpy()), self.reader.refs[name].dtype)
        _set_param(self.embed, "weight", torch.from_numpy(rows))
        pad = getattr(self.embed, "padding_idx", None)
        self.embed.padding_idx = None  # an index into the full table (it only masks gradients)
        try:
            return self.embed(inverse)  # the module's own forward: scaled embeddings stay scaled
        finally:
            self.embed.padding_idx = pad
            self._drop(self.embed)

    def _capture(self, unit: Unit) -> None:
        """Record what the model passes each decoder layer for ``unit`` (hidden state of layer 0)."""
        torch = self.torch
        calls: list = [None] * len(self.layers)

        class Stand(torch.nn.Module):
            def __init__(self, i):
                super().__init__()
                self.i = i

            def forward(self, hidden, *args, **kwargs):
                if self.i == 0:
                    unit.h = hidden
                calls[self.i] = (args, kwargs)
                return hidden

        class Stop(torch.nn.Module):
            def forward(self, *a, **k):
                raise _Captured

        layers, norm = self.decoder.layers, self.decoder.norm
        self.decoder.layers = torch.nn.ModuleList([Stand(i) for i in range(len(layers))])
        self.decoder.norm = Stop()
        try:
            self.decoder(inputs_embeds=self._embed(unit.ids), attention_mask=unit.mask, use_cache=False)
        except _Captured:
            pass
        finally:
            self.decoder.layers, self.decoder.norm = layers, norm
        if any(c is None for c in calls):
            raise EdgetuneError(f"{self.model_dir.name}: the model's forward skipped decoder layers; it cannot be streamed.",
                                where=str(self.model_dir))
        unit.calls = calls

    def _head(self, h):
        """Logits [positions, vocab] of final hidden states ``h`` [positions, hidden], in row chunks."""
        torch = self.torch
        from .tensors import to_float32

        pname = self._prefix(self.head) + "weight"
        bias = None
        if getattr(self.head, "bias", None) is not None:
            bias = torch.from_numpy(self._weight(self._prefix(self.head) + "bias"))
        full = None
        if self.adapter is not None and (pname in self.adapter.replaced or pname[: -len(".weight")] in self.adapter.layers):
            full = self._weight(pname)  # an adapted output layer: merged whole (rare: modules_to_save)
        name = self._checkpoint_name(pname)
        vocab = self.reader.refs[name].shape[0] if full is None else full.shape[0]
        out = torch.empty((h.shape[0], vocab), dtype=torch.float32)
        for a in range(0, vocab, HEAD_CHUNK_ROWS):
            b = min(vocab, a + HEAD_CHUNK_ROWS)
            w = full[a:b] if full is not None else to_float32(self.reader.rows(name, a, b), self.reader.refs[name].dtype)
            out[:, a:b] = torch.nn.functional.linear(h, torch.from_numpy(np.ascontiguousarray(w)),
                                                     None if bias is None else bias[a:b])
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        if cap:
            out = torch.tanh(out / cap) * cap
        return out

    # ---------------------------------------------------------------- the pass

    def groups(self, units: list[Unit]) -> list[list[Unit]]:
        """``units`` in the groups :meth:`run` streams the weights for (hidden states under :data:`HIDDEN_BUDGET`)."""
        hidden = int(self.text_config.hidden_size)
        return list(budget_groups(units, lambda u: int(u.ids.numel()) * hidden * 4, HIDDEN_BUDGET))

    def run(self, units: list[Unit], *, logits: bool = True, on_unit: Callable[[Unit], None] | None = None,
            on_layer: Callable[[], None] | None = None) -> Iterable[tuple[Unit, object]]:
        """Push ``units`` through the model, block-major, in groups that fit :data:`HIDDEN_BUDGET`.

        Yields ``(unit, logits)`` per unit in order (``logits`` [B, kept positions, vocab] fp32, or
        None when ``logits=False``: callers that only watch activations, like the importance
        matrix, skip the norm and output layer). ``on_unit`` is called before a unit enters each
        layer (hooks read which unit is in flight); ``on_layer`` after each layer of each group
        (a group streams every layer once: ``passes x len(layers)`` calls in all).
        """
        torch = self.torch
        with torch.no_grad():
            for group in self.groups(units):
                self.passes += 1
                for u in group:
                    self._capture(u)
                for i, layer in enumerate(self.layers):
                    self._materialise(layer)
                    self.resident += 1
                    self.max_resident = max(self.max_resident, self.resident)
                    try:
                        for u in group:
                            if on_unit is not None:
                                on_unit(u)
                            args, kwargs = u.calls[i]
                            out = layer(u.h, *args, **kwargs)
                            u.h = out[0] if isinstance(out, tuple) else out
                    finally:
                        self._drop(layer)
                        self.resident -= 1
                    if on_layer is not None:
                        on_layer()
                for u in group:
                    u.calls = []
                if logits:
                    self._materialise(self.norm)
                    try:
                        for u in group:
                            u.h = self.norm(u.h)
                    finally:
                        self._drop(self.norm)
                for u in group:
                    out = None
                    if logits:
                        h = u.h if u.keep is None else u.h[:, u.keep]
                        b, n, d = h.shape
                        out = self._head(h.reshape(b * n, d)).reshape(b, n, -1)
                    u.h = None
                    yield u, out


def _set_param(module, name: str, tensor) -> None:
    import torch

    *path, leaf = name.split(".")
    for p in path:
        module = getattr(module, p)
    module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)


def budget_groups(items: list, size: Callable[[object], int], budget: float):
    """Consecutive ``items`` grouped so that each group's summed ``size`` stays within ``budget``
    (an item larger than the budget goes alone)."""
    group: list = []
    total = 0
    for item in items:
        n = size(item)
        if group and total + n > budget:
            yield group
            group, total = [], 0
        group.append(item)
        total += n
    if group:
        yield group


def logits(model_dir, token_lists: list[list[int]], *, keep: list[slice] | None = None, adapter=None,
           model: StreamedModel | None = None) -> list[np.ndarray]:
    """fp32 next-token logits of each sequence (one unpadded forward each, as
    ``model(torch.tensor([ids])).logits[0]`` computes them), at ``keep[i]`` positions when given."""
    import torch

    from .console import progress

    sm = model or StreamedModel(model_dir, adapter=adapter)
    units = [Unit(torch.tensor([ids]), keep=(keep[i] if keep else None)) for i, ids in enumerate(token_lists)]
    with progress(transient=True) as bar:  # minutes per pass at 8B on two cores
        task = bar.add_task("fp32 reference, layer by layer", total=len(sm.groups(units)) * len(sm.layers))
        return [out[0].numpy() for _, out in sm.run(units, on_layer=lambda: bar.advance(task))]


def estimate_peak(model_dir, *, tokens: int, logit_positions: int = 0) -> dict:
    """Estimated peak anonymous memory (bytes, by part) of a streamed fp32 pass over ``tokens``
    tokens (those in flight at once) that keeps logits at ``logit_positions`` positions.

    The runtime, then the larger of (one decoder block in fp32 while it runs, with the tokens'
    activations inside it) and (the output layer's chunk and the logits kept: they come after the
    last block is dropped). Calibrated on random-weight Llama shapes (scripts/bench_scale.py, importance
    matrix over 1,000 tokens, measured with shared/tools/peakmem): 0.44 / 0.80 / 0.97 GB at
    135M / 1.17B / 3.1B parameters against 0.44 / 0.81 / 0.97 estimated.
    """
    from .arch import arch_of_model_dir
    from .train.memory import _linear_shapes, _model_shapes

    s = _model_shapes(model_dir)
    lin = _linear_shapes(s, arch_of_model_dir(model_dir))
    block = (sum(i * o for i, o in lin.values()) + 2 * s["hidden"]) * 4.0
    tokens = int(tokens)
    # in a block, per token: ~2 hidden-wide fp32 tensors alive at once (the residual and the one being
    # computed) and the MLP's ~3 intermediate-wide ones (gate, up, their product); beside them the
    # hidden states of the group's other units wait (at most HIDDEN_BUDGET)
    acts = tokens * 4.0 * (2 * s["hidden"] + 3 * s["inter"]) + min(tokens * s["hidden"] * 4.0, HIDDEN_BUDGET)
    parts = {
        "runtime": RUNTIME_BYTES,
        "block": block * BLOCK_OVERHEAD,  # fp32 weights plus the bf16 bytes of the tensor being widened
        "activations": acts,
        "head": HEAD_CHUNK_ROWS * s["hidden"] * 6.0 + logit_positions * s["vocab"] * 4.0,
    }
    parts["total"] = parts["runtime"] + max(parts["block"] + parts["activations"], parts["head"])
    return parts
