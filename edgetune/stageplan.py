"""What each stage of a run will cost before anything loads: peak memory, disk, time, and whether it fits.

One row per stage of :data:`edgetune.stages.STAGE_TABLE` in :data:`STAGE_COSTS`, each a small
function of the model's shape and the run config returning a :class:`Cost` (peak bytes, disk
bytes, seconds, and the fixes that make it smaller). ``edgetune plan``, ``edgetune train --dry-run`` and the refusal in ``edgetune run`` /
``edgetune train`` all read :func:`plan_stages`; the CLI only prints.

Memory is what must be resident: anonymous memory (heap, tensors) plus the weights a stage reads
every step even when they are an mmapped file (a training base in the saved dtype is file-backed on
CPU, but evicting it thrashes the disk). Sources of the figures:

* train / align: :func:`edgetune.train.memory.estimate_memory` (measured at three sizes, see there);
* export verification, imatrix, eval drift against an hf reference: streamed fp32 passes, sized by
  :func:`edgetune.streaming.estimate_peak`;
* fuse and the GGUF conversion without verification stream tensor by tensor: the runtime plus about
  a tenth of the model's bf16 bytes (measured 0.30 and 0.47 GB at 1.17B parameters; README, "Real model sizes");
* llama.cpp stages (quantize, quant auto, the gguf eval runner) mmap the GGUF, but on CPU llama.cpp
  may repack quantized weights into anonymous buffers: counted as the whole file, conservatively.

Time is an estimate from FLOPs (forward 2·params·tokens; LoRA training 4·params·tokens because the
frozen weights get no gradient, 6 with full fine-tuning or recomputation) divided by a throughput:
this machine's rate measured in training (:data:`CPU_TRAIN_GFLOPS`), or a target's table figure. Decoding is memory-bound: weight bytes per token
over :data:`DEFAULT_MEM_GBPS`.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .hardware import FIT_MARGIN, GB
from .qtypes import AUTO, LADDER, QTYPES
from .stages import STAGES
from .train.memory import RUNTIME, count_params

STREAMED_FRACTION = 0.1  # fuse / export without verification: of the model's bf16 bytes, beside RUNTIME
LLAMA_CTX = 0.25e9  # a llama.cpp context's compute buffers beside its KV cache (n_ctx 2048, 1-8B models)
# effective GFLOP/s of LoRA training on 2 cores (4·params·tokens / wall), measured with
# scripts/bench_train_memory.py on an Intel Xeon with AMX: 1.17B, batch 4 x 512, bf16 473 and
# batch 2 x 256 fp32 95. An AVX2-only CPU emulates bf16 (README, "Precision is chosen from your hardware") and trains in fp32.
CPU_TRAIN_GFLOPS = {"bf16": 400.0, "fp16": 400.0, "fp32": 95.0}
DEFAULT_MEM_GBPS = 10.0  # decode: weights streamed per token (2 cores; measured 8 GB/s on an AVX2 EPYC)
DISK_GBPS = 0.5  # reading / writing model files (a laptop SSD does more; shared cloud disks less)
QUANT_PARAMS_PER_S = 1.5e8  # llama.cpp quantize throughput (parameters/s, 2 threads, k-quants)
FORWARD_EFFICIENCY = 1.0  # streamed fp32 forwards (verification, imatrix) vs training's rate in fp32

# ---------------------------------------------------------------------------------------------
# targets: one row per machine kind a plan can be checked against


@dataclass(frozen=True)
class Target:
    name: str
    memory_gb: float  # what the training device offers (Macs: unified memory; GPUs: VRAM)
    host_gb: float  # RAM for the CPU stages (fuse, export, imatrix, quantize, gguf eval)
    device: str  # mlx | cuda | cpu: which backend trains there
    gflops: float  # effective bf16/fp16 dense matmul throughput for training (GFLOP/s)
    mem_gbps: float  # memory bandwidth for decoding (GB/s)
    note: str = ""

    @property
    def usable_gb(self) -> float:
        """Memory a stage on the training device may use: Metal lets the GPU wire about 2/3 of a
        Mac's unified memory up to 36 GB and about 3/4 above (``recommendedMaxWorkingSetSize``; mlx-lm's
        README, "Large models"); a CUDA context and the allocator's slack take ~1 GB of VRAM."""
        if self.device == "mlx":
            return self.memory_gb * (0.67 if self.memory_gb <= 36 else 0.75)
        if self.device == "cuda":
            return self.memory_gb - 1.0
        return self.memory_gb * FIT_MARGIN

    @property
    def host_usable_gb(self) -> float:
        return self.usable_gb if self.device == "mlx" else self.host_gb * FIT_MARGIN


# Sources: Apple's tech specs (unified memory; GPU FP16 throughput: M1 2.6, M2 3.6, M3/M4 ~4 TFLOP/s
# for the base chips, Pro about 2x, Max about 4x; bandwidth 100-120 GB/s base, 150-270 Pro, 400-546
# Max) and NVIDIA's datasheets (dense bf16 tensor throughput with fp32 accumulate; memory
# bandwidth). Training throughput is taken at ~35% of the datasheet's dense figure (LoRA on one GPU
# rarely does better). GPU rows assume a 32 GB host for the CPU stages.
TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("mac-8gb", 8, 8, "mlx", 0.35 * 3600, 100, "8 GB M-series Mac (M1/M2 base)"),
    Target("mac-16gb", 16, 16, "mlx", 0.35 * 3600, 100, "16 GB M-series Mac (M1/M2/M3 base)"),
    Target("mac-18gb", 18, 18, "mlx", 0.35 * 7000, 150, "18 GB M3 Pro"),
    Target("mac-24gb", 24, 24, "mlx", 0.35 * 4000, 120, "24 GB M2/M3/M4 base"),
    Target("mac-32gb", 32, 32, "mlx", 0.35 * 13000, 400, "32 GB M1/M2 Max"),
    Target("mac-36gb", 36, 36, "mlx", 0.35 * 14000, 300, "36 GB M3 Max / M4 Pro class"),
    Target("mac-48gb", 48, 48, "mlx", 0.35 * 9000, 270, "48 GB M4 Pro"),
    Target("mac-64gb", 64, 64, "mlx", 0.35 * 13000, 400, "64 GB M1/M2/M3 Max"),
    Target("mac-128gb", 128, 128, "mlx", 0.35 * 17000, 546, "128 GB M3/M4 Max"),
    Target("rtx-3060-12gb", 12, 32, "cuda", 0.35 * 51000, 360, "RTX 3060 12 GB"),
    Target("rtx-3090-24gb", 24, 32, "cuda", 0.35 * 71000, 936, "RTX 3090 24 GB"),
    Target("rtx-4070-12gb", 12, 32, "cuda", 0.35 * 58000, 504, "RTX 4070 12 GB"),
    Target("rtx-4080-16gb", 16, 32, "cuda", 0.35 * 97000, 717, "RTX 4080 16 GB"),
    Target("rtx-4090-24gb", 24, 32, "cuda", 0.35 * 165000, 1008, "RTX 4090 24 GB"),
    Target("rtx-5090-32gb", 32, 64, "cuda", 0.35 * 209000, 1792, "RTX 5090 32 GB"),
    Target("t4-16gb", 16, 32, "cuda", 0.35 * 65000, 320, "Tesla T4 16 GB (fp16, no bf16)"),
    Target("l4-24gb", 24, 32, "cuda", 0.35 * 121000, 300, "L4 24 GB"),
    Target("a100-40gb", 40, 64, "cuda", 0.35 * 312000, 1555, "A100 40 GB"),
    Target("a100-80gb", 80, 128, "cuda", 0.35 * 312000, 2039, "A100 80 GB"),
    Target("h100-80gb", 80, 128, "cuda", 0.35 * 989000, 3350, "H100 SXM 80 GB"),
)}


def parse_memory(text: str) -> float:
    """``16GB`` / ``16 GiB`` / ``16000MB`` / ``16`` -> GB."""
    from .errors import EdgetuneError

    t = str(text).strip().lower().replace(" ", "")
    units = (("gib", 2**30 / GB), ("gb", 1.0), ("g", 1.0), ("mib", 2**20 / GB), ("mb", 1e-3), ("tb", 1e3))
    for unit, scale in units:
        if t.endswith(unit):
            t, mult = t[: -len(unit)], scale
            break
    else:
        mult = 1.0
    try:
        value = float(t) * mult
    except ValueError:
        raise EdgetuneError(f"--target-memory {text!r} is not a size.", fix="e.g. --target-memory 16GB") from None
    if value <= 0:
        raise EdgetuneError(f"--target-memory {text!r} must be positive.", fix="e.g. --target-memory 16GB")
    return value


def this_machine() -> Target:
    """This machine: memory available now, the backend training would pick, the probe's throughput."""
    total, avail = _memory()
    device = "cpu"
    with contextlib.suppress(Exception):
        from .hardware import probe

        hw = probe()
        device = "cuda" if hw.cuda else "mlx" if (hw.apple_silicon and hw.mlx) else "cpu"
        if hw.cuda and hw.cuda_devices:
            vram = float(hw.cuda_devices[0].get("memory_gb") or 0)
            return Target("this machine", vram, avail, "cuda", 0.35 * 100000, 900,
                          f"{hw.cuda_devices[0].get('name', 'CUDA GPU')}, {avail:.1f} GB RAM available")
    return Target("this machine", avail, avail, device, _cpu_gflops(), DEFAULT_MEM_GBPS,
                  f"{avail:.1f} of {total:.1f} GB available now")


def resolve_target(target: str | None = None, target_memory: str | None = None) -> Target:
    """``--target NAME`` (a row of :data:`TARGETS`), ``--target-memory SIZE`` (this machine's kind with
    that much memory), both (the profile with its memory replaced), or neither (this machine)."""
    from .errors import EdgetuneError

    if target:
        key = target.strip().lower()
        if key not in TARGETS:
            raise EdgetuneError(f"Unknown target {target!r}.", fix=f"use one of: {', '.join(TARGETS)}, or --target-memory 16GB")
        t = TARGETS[key]
    else:
        t = this_machine()
    if target_memory:
        gb = parse_memory(target_memory)
        host = gb if t.device != "cuda" else t.host_gb
        t = Target(f"{t.name}, {gb:g} GB" if target else f"{gb:g} GB", gb, host, t.device, t.gflops, t.mem_gbps,
                   f"{gb:g} GB stated (--target-memory)")
    return t


def _memory() -> tuple[float, float]:
    try:
        from .hardware import memory_gb

        return memory_gb()
    except Exception:  # noqa: BLE001 - psutil missing: assume the design machine
        return 24.0, 20.0


def _cpu_gflops(dtype: str | None = None) -> float:
    """Effective training throughput of this CPU in ``dtype`` (the training dtype when None), from
    :data:`CPU_TRAIN_GFLOPS` scaled by the core count. Not from edgetune.precision's probe: its
    256x768x768 matmul measured 42 GFLOP/s where LoRA training of a 1.17B model ran at ~400 (AMX)."""
    import os

    if dtype is None:
        try:
            from .precision import decide

            dtype = decide("train", "cpu").dtype
        except Exception:  # noqa: BLE001 - no torch: the slower figure
            dtype = "fp32"
    return CPU_TRAIN_GFLOPS.get(dtype, CPU_TRAIN_GFLOPS["fp32"]) * (os.cpu_count() or 2) / 2


# ---------------------------------------------------------------------------------------------
# model shapes: from the folder, or from a table when the folder is not downloaded yet

# config.json fields of common base models (from each model's config.json on the Hugging Face hub),
# so `edgetune plan` can size a recipe before its multi-GB download. Matched on the folder name.
KNOWN_MODELS: dict[str, dict] = {
    "mistral-7b-instruct-v0.3": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                     head_dim=128, vocab_size=32768, tie_word_embeddings=False,
                                     max_position_embeddings=32768),
    "meta-llama-3.1-8b-instruct": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                       head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                                       max_position_embeddings=131072),
    "llama-3.2-1b-instruct": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                  tie_word_embeddings=True, max_position_embeddings=131072),
    "llama-3.2-3b-instruct": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                  num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                  tie_word_embeddings=True, max_position_embeddings=131072),
    "qwen2.5-0.5b-instruct": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                  num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                  tie_word_embeddings=True, max_position_embeddings=32768),
    "qwen2.5-1.5b-instruct": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                  num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                  tie_word_embeddings=True, max_position_embeddings=32768),
    "smollm2-1.7b-instruct": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                  num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
                                  tie_word_embeddings=True, max_position_embeddings=8192),
}


def known_shape(model_ref: str | Path | None) -> dict | None:
    """The table's config for a model folder or hub id named like a known model, else None."""
    if not model_ref:
        return None
    name = Path(str(model_ref)).name.lower()
    return KNOWN_MODELS.get(name) or KNOWN_MODELS.get(name.removesuffix("-instruct") + "-instruct")


@contextlib.contextmanager
def shape_dir(model_dir: Path | None, model_ref: str | None = None) -> Iterator[tuple[Path | None, str]]:
    """(a folder whose config.json describes the model, where the shape came from). A missing folder
    of a known model gets a temporary folder holding only the table's config.json, so every estimator
    (which reads config.json) sizes it without a download."""
    if model_dir is not None and (Path(model_dir) / "config.json").is_file():
        yield Path(model_dir), "config.json"
        return
    cfg = known_shape(model_dir) or known_shape(model_ref)
    if cfg is None:
        yield None, "unknown"
        return
    with tempfile.TemporaryDirectory(prefix="edgetune-shape-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        yield Path(tmp), "the known-models table (folder not downloaded)"


# ---------------------------------------------------------------------------------------------
# the per-stage rows


@dataclass
class Cost:
    stage: str
    peak_bytes: float  # what must be resident at the stage's peak
    disk_bytes: float  # what the stage leaves on disk
    seconds: float | None
    how: str  # what the peak is made of, in words
    device: str = "host"  # host | train (the training device: VRAM on a GPU target)
    fixes: list[str] = field(default_factory=list)  # what lowers the peak, most effective first
    fits: bool | None = None
    limit_bytes: float | None = None

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / GB

    def as_dict(self) -> dict:
        return {"stage": self.stage, "peak_gb": round(self.peak_gb, 2), "disk_gb": round(self.disk_bytes / GB, 2),
                "seconds": None if self.seconds is None else round(self.seconds), "how": self.how, "device": self.device,
                "fits": self.fits, "limit_gb": None if self.limit_bytes is None else round(self.limit_bytes / GB, 2),
                "fixes": self.fixes}


@dataclass
class Inputs:
    """What every row reads: the model's shape folder, the run config, the target, token counts."""

    model_dir: Path  # a folder with config.json (maybe only that)
    cfg: object  # RunConfig
    target: Target
    params: int
    train_tokens: float | None  # tokens the train stage processes (all steps), when known
    calib_tokens: float  # imatrix calibration tokens
    eval_examples: int


def _shapes(model_dir: Path) -> dict:
    from .train.memory import _model_shapes

    return _model_shapes(model_dir)


def _bf16_bytes(i: Inputs) -> float:
    return i.params * 2.0


def _train_precision(i: Inputs, tcfg) -> str:
    if tcfg.precision != "auto":
        return tcfg.precision
    if i.target.device in ("cuda", "mlx"):
        return "bf16"
    from .precision import decide

    return decide("train", "cpu").dtype


def _train_cost(i: Inputs, tcfg, stage: str, extra_disk: float = 0.0) -> Cost:
    from .train.memory import estimate_memory

    prec = _train_precision(i, tcfg)
    if tcfg.method == "qlora" and i.target.device == "cpu":
        prec = "bf16"  # torch QLoRA needs CUDA: this row sizes it as if it could run
    m = estimate_memory(i.model_dir, tcfg, precision=prec, device=i.target.device)
    peak = m["total_gb"] * GB
    flops_per_token = (6.0 if tcfg.method == "full" or tcfg.gradient_checkpointing or tcfg.method == "qlora" else 4.0) * i.params
    if tcfg.objective == "dpo":
        flops_per_token += 2.0 * i.params  # the reference pass
    seconds = None
    if i.train_tokens:
        gflops = _cpu_gflops(prec) if i.target.device == "cpu" else i.target.gflops
        seconds = i.train_tokens * flops_per_token / (gflops * 1e9)
    fixes = []
    if tcfg.method not in ("qlora",) and i.target.device in ("mlx", "cuda"):
        fixes.append("train.method: qlora (a 4-bit base: weights " + f"{m['weights_gb']:.1f} GB -> ~{m['weights_gb'] * 0.28:.1f} GB)")
    if not tcfg.gradient_checkpointing and tcfg.method != "qlora":
        fixes.append("train.gradient_checkpointing: true (keeps one layer's activations, ~30% slower)")
    if tcfg.batch_size > 1:
        fixes.append(f"train.batch_size: {max(1, tcfg.batch_size // 2)} with train.grad_accum: {tcfg.grad_accum * 2} (same effective batch)")
    seq = tcfg.max_seq_len or 2048
    if seq > 256:
        fixes.append(f"train.max_seq_len: {seq // 2} (shorter rows; drop or truncate longer examples)")
    parts = f"weights {m['weights_gb']:.2f} ({m['precision']}), adapter+optimizer {m['adapter_gb'] + m['optimizer_gb']:.2f}, " \
            f"activations {m['activations_gb']:.2f}" + (f", reference pass {m['reference_pass_gb']:.2f}" if m.get("reference_pass_gb") else "") \
            + f", runtime {m.get('runtime_gb', 0):.2f} GB"
    adapter = m["trainable_params_m"] * 1e6 * 4.0
    disk = adapter * 4 * 2 + adapter + extra_disk  # last/ and best/ checkpoints (adapter + AdamW moments) + the adapter
    return Cost(stage, peak, disk, seconds, parts, device="train", fixes=fixes)


def _cost_data(i: Inputs) -> Cost:
    size = 0.0
    with contextlib.suppress(Exception):
        from .recipes import resolve_data

        p = resolve_data(i.cfg.data.path)
        size = sum(f.stat().st_size for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file())
    return Cost("data", RUNTIME + 3 * size, 2 * size, 5 + size / 2e6, "the records, their tokens and MinHash signatures")


def _cost_train(i: Inputs) -> Cost:
    return _train_cost(i, i.cfg.train, "train")


def _cost_align(i: Inputs) -> Cost | None:
    if not i.cfg.align.enabled:
        return None
    # the SFT adapter is merged into a bf16 copy of the base first (RUN/align/sft_model/), then DPO/ORPO trains on it
    c = _train_cost(i, i.cfg.align.train_config(), "align", extra_disk=_bf16_bytes(i))
    c.seconds = None  # the preference split's size is unknown before the data stage
    return c


def _streamed(i: Inputs) -> float:
    return RUNTIME + STREAMED_FRACTION * _bf16_bytes(i)


def _cost_fuse(i: Inputs) -> Cost:
    b = _bf16_bytes(i)
    return Cost("fuse", _streamed(i), b, 2 * b / (DISK_GBPS * GB), "streamed tensor by tensor (bf16 in, bf16 out)")


def _verify_tokens() -> int:
    """Tokens of the verification corpus, at ~3.5 characters a token (conservative for its code and unicode)."""
    try:
        from .export.verify import PROMPTS

        return max(64, int(sum(len(p) for p in PROMPTS) / 3.5))
    except Exception:  # noqa: BLE001
        return 2048


def _stream_peak(i: Inputs, tokens: int, logit_positions: int) -> float:
    from .streaming import estimate_peak

    return float(estimate_peak(i.model_dir, tokens=tokens, logit_positions=logit_positions)["total"])


def _forward_seconds(i: Inputs, tokens: float, dtype: str = "fp32") -> float:
    gflops = _cpu_gflops(dtype) * FORWARD_EFFICIENCY if i.target.device == "cpu" else i.target.gflops
    return 2.0 * i.params * tokens / (gflops * 1e9) + _bf16_bytes(i) / (DISK_GBPS * GB)


def _gguf_bytes(i: Inputs, qtype: str) -> float:
    return i.params * QTYPES[qtype].bits / 8


def _cost_export(i: Inputs) -> Cost:
    e = i.cfg.export
    out = _gguf_bytes(i, e.outtype)
    convert_peak = _streamed(i)
    peak, how, fixes = convert_peak, "GGUF conversion streamed tensor by tensor", []
    seconds = 2 * out / (DISK_GBPS * GB)
    if e.verify:
        vt = _verify_tokens()
        v = _stream_peak(i, vt, vt) + LLAMA_CTX
        seconds += _forward_seconds(i, vt) + 2.0 * i.params * vt / (i.target.gflops * 1e9)
        if v > peak:
            peak, how = v, f"verification: streamed fp32 reference over ~{vt} tokens + a llama.cpp context on the mmapped GGUF"
        fixes.append("export.verify: false (skip the HF-vs-GGUF logit check)")
    quants = [q for q in e.quants if q != e.outtype]
    auto = quants == [AUTO]
    if auto:
        ladder = e.ladder or list(LADDER)
        disk = out + sum(_gguf_bytes(i, q) for q in ladder)
        # each candidate is quantized, then run by llama.cpp beside the f16 file on held-out texts; both
        # stay mmapped (measuring contexts keep no repacked copy of the weights: export/verify.py)
        q_peak = RUNTIME + 2 * LLAMA_CTX
        heldout = 4096
        seconds += len(ladder) * (i.params / QUANT_PARAMS_PER_S + 2 * 2.0 * i.params * heldout / (i.target.gflops * 1e9))
        if q_peak > peak:
            peak, how = q_peak, f"quant auto: two llama.cpp contexts on mmapped GGUFs while {len(ladder)} types are measured"
        fixes.append("export.quants: [q4_k_m] (one type instead of the auto ladder)")
    else:
        disk = out + sum(_gguf_bytes(i, q) for q in quants)
        q_peak = RUNTIME + 3 * _largest_tensor_f32(i)
        seconds += len(quants) * i.params / QUANT_PARAMS_PER_S
        if q_peak > peak:
            peak, how = q_peak, "quantize: llama.cpp reads the mmapped GGUF, one tensor at a time in fp32"
        if e.verify and quants:
            seconds += len(quants) * 2 * 2.0 * i.params * 512 / (i.target.gflops * 1e9)
    return Cost("export", peak, disk, seconds, how, fixes=fixes)


def _cost_imatrix(i: Inputs) -> Cost | None:
    """The importance matrix (export.imatrix: auto and a quant type that reads one): its own row, it
    runs inside the export stage first."""
    e = i.cfg.export
    types = list(LADDER) if AUTO in e.quants else e.quants
    if e.route == "adapter":  # the adapter ships on the source GGUF: nothing is quantized
        return None
    if e.imatrix != "auto" or not any(QTYPES[q].imatrix for q in types if q in QTYPES):
        return None
    try:
        from .export.imatrix import BATCH_TOKENS
    except ImportError:
        BATCH_TOKENS = 4096  # noqa: N806
    peak = _stream_peak(i, BATCH_TOKENS, 0)
    return Cost("imatrix", peak, 0.01 * GB, _forward_seconds(i, i.calib_tokens),
                f"streamed fp32 forward, {BATCH_TOKENS} tokens a batch, {int(i.calib_tokens):,} calibration tokens",
                fixes=["export.imatrix: off (k-quants work without one, slightly less accurately)"])


def _kv_bytes(s: dict, tokens: int, bytes_per: float) -> float:
    return 2.0 * s["layers"] * s["kv_heads"] * s["head_dim"] * tokens * bytes_per


def _largest_tensor_f32(i: Inputs) -> float:
    s = _shapes(i.model_dir)
    return 4.0 * max(s["vocab"] * s["hidden"], s["inter"] * s["hidden"])


def _cost_eval(i: Inputs) -> Cost:
    """Base and tuned on the hf runner (whole model at the eval dtype), the Modelfile's GGUF on llama.cpp;
    one runner at a time, so the peak is the larger. Where the hf runner cannot fit, the rows that fit
    are the GGUF runner's on the unquantized export (mmapped on CPU; resident on a Mac's GPU)."""
    ev = i.cfg.eval
    s = _shapes(i.model_dir)
    dtype = ev.dtype
    if dtype == "auto":
        dtype = "bfloat16" if i.target.device in ("cuda", "mlx") else _eval_dtype()
    bytes_per = 4.0 if dtype == "float32" else 2.0
    batch = ev.batch_size or 8
    from .eval.fit import hf_runner_bytes

    hf = hf_runner_bytes(i.model_dir, dtype, batch, i.params)  # what the run's eval stage decides on (eval/fit.py)
    quant = i.cfg.ollama.quant or next((q for q in i.cfg.export.quants if q != AUTO), "q4_k_m")
    resident = i.target.device != "cpu"  # Metal / CUDA hold the file in GPU memory; CPU llama.cpp mmaps it

    def gguf(qtype: str) -> float:
        file = _gguf_bytes(i, qtype)
        return RUNTIME + (file if resident or _repacked(qtype) else 0.0) + _kv_bytes(s, ev.n_ctx, 2.0) + LLAMA_CTX

    limit = i.target.host_usable_gb * GB
    peak, how = hf, f"hf runner: whole model in {dtype} ({i.params * bytes_per / GB:.1f} GB) + KV cache of {batch} rows"
    fixes = [f"eval the base and tuned models on the {i.cfg.export.outtype} GGUF (llama.cpp) instead of the hf runner",
             "eval.dtype: bfloat16 (half of float32)" if dtype == "float32" else "eval.batch_size: 1"]
    if hf > limit:
        # the GGUF runner on the unquantized export, else on a q8_0 one when the run exports it (issue 24)
        kinds = [i.cfg.export.outtype] + (["q8_0"] if "q8_0" in i.cfg.export.quants else [])
        kind = next((k for k in kinds if gguf(k) <= limit), kinds[-1])
        peak, how = gguf(kind), (f"hf runner would need {hf / GB:.1f} GB: base/tuned on llama.cpp over the "
                                 f"{kind} GGUF ({'resident' if resident else 'mmapped'})")
        if "q8_0" not in kinds:
            fixes.insert(0, "add q8_0 to export.quants: base/tuned then run on the q8_0 GGUF (half of f16)")
    if ev.drift_reference:
        d = _stream_peak(i, 2048, 2048)
        if d > peak:
            peak, how = d, "eval drift: streamed fp32 reference over the eval prompts"
    q = gguf(quant)
    if q > peak:
        peak, how = q, f"gguf runner on {quant}: weights + KV cache"
    from .eval.data import regression_count

    n = i.eval_examples + regression_count(ev.regression)
    new = min(ev.max_tokens, 128)  # most answers stop long before max_tokens
    per_token_hf = i.params * bytes_per / (i.target.mem_gbps * GB) / max(1, min(batch, 8)) * 2
    per_token_q = _gguf_bytes(i, quant) / (i.target.mem_gbps * GB)
    seconds = n * new * (2 * per_token_hf + per_token_q)
    return Cost("eval", peak, 0.01 * GB, seconds, how, fixes=fixes)


def _repacked(qtype: str) -> bool:
    """llama.cpp's CPU backend repacks these into interleaved anonymous buffers (ggml-cpu "extra"
    buffer types: Q4_0, IQ4_NL and, on AVX2/ARM, Q4_K): count them as copied, conservatively."""
    return qtype.startswith(("q4_0", "iq4_nl", "q4_k"))


def _eval_dtype() -> str:
    try:
        from .precision import decide

        return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[decide("score", "cpu").dtype]
    except Exception:  # noqa: BLE001
        return "float32"


def _cost_ollama(i: Inputs) -> Cost:
    return Cost("ollama", RUNTIME, 1e4, 5.0, "reads the GGUF's metadata and renders the chat template")


def _cost_register(i: Inputs) -> Cost:
    return Cost("register", RUNTIME / 3, 1e6, 1.0, "copies the manifest and metrics (the GGUFs are linked, not copied)")


# one cost per stage of edgetune.stages.STAGE_TABLE; None from one: the stage does nothing in this config.
# "imatrix" is sized as its own row: it runs inside the export stage, before the conversion's quantization
STAGE_COSTS: dict[str, Callable[[Inputs], Cost | None]] = {
    "data": _cost_data,
    "train": _cost_train,
    "align": _cost_align,
    "fuse": _cost_fuse,
    "imatrix": _cost_imatrix,
    "export": _cost_export,
    "ollama": _cost_ollama,
    "eval": _cost_eval,
    "register": _cost_register,
}
COST_ROWS = tuple(n for s in STAGES for n in (("imatrix", s) if s == "export" else (s,)))  # the table's order


# ---------------------------------------------------------------------------------------------


@dataclass
class StagePlan:
    target: Target
    shape_source: str
    params: int
    costs: list[Cost]
    train_tokens: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(c.fits is not False for c in self.costs)

    def cost(self, stage: str) -> Cost | None:
        return next((c for c in self.costs if c.stage == stage), None)

    def as_dict(self) -> dict:
        t = self.target
        return {"target": {"name": t.name, "device": t.device, "memory_gb": round(t.memory_gb, 2),
                           "usable_gb": round(t.usable_gb, 2), "host_usable_gb": round(t.host_usable_gb, 2), "note": t.note},
                "shape_source": self.shape_source, "params": self.params, "fits": self.fits,
                "train_tokens": self.train_tokens, "stages": [c.as_dict() for c in self.costs], "notes": self.notes}


def _data_tokens(cfg) -> tuple[float | None, int, float | None]:
    """(tokens the train stage processes in all, test examples, tokens in the train split) from the
    recipe: step counts when ``train.iters`` is set (rows filled by packing, at most the data), else
    the data file's size at ~4 bytes a token (JSON keys and the chat template roughly cancel out)."""
    t = cfg.train
    n_records, nbytes = 0, 0
    with contextlib.suppress(Exception):
        from .recipes import resolve_data

        p = resolve_data(cfg.data.path)
        files = [f for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file() and f.suffix in (".jsonl", ".json", ".txt")]
        for f in files:
            nbytes += f.stat().st_size
            with open(f, "rb") as fh:
                n_records += sum(1 for _ in fh)
    share = max(0.0, 1.0 - cfg.data.valid_ratio - cfg.data.test_ratio)
    test = int(n_records * cfg.data.test_ratio)
    if cfg.eval.limit:
        test = min(test, cfg.eval.limit) if test else cfg.eval.limit
    seq = t.max_seq_len or 512
    if t.iters:
        tokens = float(t.iters * t.batch_size * t.grad_accum * seq)
        return tokens, test, (nbytes * share / 4.0 or None)
    if nbytes:
        return t.epochs * nbytes * share / 4.0, test, nbytes * share / 4.0
    return None, test, None


def plan_stages(cfg, model_dir: Path | None, target: Target, *, train_tokens: float | None = None,
                stages: list[str] | None = None) -> StagePlan | None:
    """Every stage's cost for ``cfg`` on ``target``, each marked fits / does not; None when the model's
    shape is unknown (no config.json and not in :data:`KNOWN_MODELS`)."""
    with shape_dir(model_dir, cfg.model) as (sdir, source):
        if sdir is None:
            return None
        params = count_params(sdir)
        tokens, test, split_tokens = _data_tokens(cfg)
        if train_tokens is not None:
            tokens = train_tokens
        calib = min(100_000.0, split_tokens or 100_000.0)  # export/imatrix.py MAX_TOKENS: 100k at most
        inp = Inputs(sdir, cfg, target, params, tokens, calib, test or 100)
        costs = []
        for name in COST_ROWS:
            if stages is not None and name not in stages:
                continue
            c = STAGE_COSTS[name](inp)
            if c is None:
                continue
            limit = target.usable_gb if c.device == "train" else target.host_usable_gb
            c.limit_bytes = limit * GB
            c.fits = c.peak_bytes <= c.limit_bytes
            costs.append(c)
    notes = []
    if tokens is None:
        notes.append("train time unknown: set train.iters, or point data.path at the data")
    return StagePlan(target, source, params, costs, tokens, notes)


def train_cost(model_dir: Path, tcfg, target: Target, tokens: float | None) -> Cost:
    """The train row alone (``edgetune train --dry-run`` and its refusal), with its fit verdict."""
    from .config import RunConfig

    cfg = RunConfig(model=str(model_dir), train=tcfg)
    inp = Inputs(Path(model_dir), cfg, target, count_params(Path(model_dir)), tokens, 0.0, 0)
    c = _train_cost(inp, tcfg, "train")
    c.limit_bytes = target.usable_gb * GB
    c.fits = c.peak_bytes <= c.limit_bytes
    return c


def refusal(p: StagePlan) -> tuple[str, str] | None:
    """(message, fix) naming each stage that cannot fit, or None when all fit."""
    bad = [c for c in p.costs if c.fits is False]
    if not bad:
        return None
    where = "this machine" if p.target.name == "this machine" else f"target {p.target.name}"
    msg = "; ".join(f"{c.stage} needs ~{c.peak_gb:.1f} GB ({c.how}), {where} offers {c.limit_bytes / GB:.1f} GB" for c in bad)
    fixes = []
    for c in bad:
        fixes += [f for f in c.fixes[:3] if f not in fixes]
    return msg, "; or ".join(fixes) + " — or --force to try anyway"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 90:
        return f"{max(1, math.ceil(s))} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
