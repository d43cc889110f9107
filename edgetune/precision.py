"""The one precision policy: which dtype each torch workload computes in on this machine, and why.

Every stage that computes with torch (training, the ``hf`` eval runner and its batching, drift, the
judge, ``fetch-demo``'s check, the bench scripts) asks :func:`decide` instead of guessing.

Why a policy and not "bf16 when the CPU says avx512": on CPUs without native bf16 (AVX2-only
x86, many ARM cores) torch *emulates* bf16 matmuls. Measured with torch 2.13, 2 threads, on an
AMD EPYC with AVX2/FMA only: 0.9 GFLOP/s in bf16 against 120 in fp32 at 1024x1024, while an Intel
part with AMX does 2,200 in bf16 against 350 in fp32. ``avx512f`` alone does not make bf16 fast,
and ARM reports bf16 in its own words, so where the flags do not settle it a probe of a couple of
seconds times the two shapes that matter in both dtypes:

* ``train``: a training-size matmul (256 rows), what training, prefill and teacher-forced scoring do;
* ``decode``: 1- to 32-row steps on a 64 MiB weight, what generation does token by token
  (memory-bound: bf16 halves the bytes, so it can win there even when it loses on big matmuls).

The timings are cached per machine (CPU model, flags, torch version, threads, probe shapes) under
``~/.cache/edgetune``; generation's dtype and batch size are priced from them. Explicit ``--precision``/``--dtype`` always wins.

Switch for tests and CI: ``EDGETUNE_CPU_BF16=slow`` makes the policy behave as on a CPU without fast
bf16, ``EDGETUNE_CPU_BF16=fast`` as on one with it; unset (or ``probe``) decides from the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from .hardware import cpu_model_and_flags

ENV_CPU_BF16 = "EDGETUNE_CPU_BF16"
# bf16 must beat fp32 by this factor before we give up fp32's accuracy for it
BF16_WIN = 1.25
# x86 flags that mean native bf16 dot products (AMX tiles, AVX512-BF16)
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# generation batch sizes the eval runner chooses among (rows decoded together)
GEN_BATCHES = (1, 4, 8, 16, 32)
# nominal generation the batch rule prices: prompt tokens per request, new tokens per request
NOMINAL_PROMPT, NOMINAL_NEW = 96, 32
# probe shapes: (rows, in, out). The decode weight is 64 MiB in fp32, larger than any CPU's L3:
# a decode step streams every weight from memory, and a cache-resident probe would flatter one-row
# steps (measured on an AMD EPYC: 32 GB/s on an 8 MiB weight, 8 GB/s on the demo model's weights).
TRAIN_SHAPE = (256, 768, 768)
DECODE_SHAPE = (1, 4096, 4096)


@dataclass
class CpuBf16:
    """Is bf16 fast on this CPU, for big matmuls (train) and for decode steps?"""

    fast_train: bool
    fast_decode: bool
    source: str  # env|flags|probe
    reason: str
    # seconds per call, by "dtype/rows" (probe only)
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Decision:
    device: str  # cpu|cuda|mps
    workload: str  # train|generate|score
    dtype: str  # fp32|bf16|fp16
    reason: str
    batch_size: int | None = None  # generation rows per call (generate only)

    @property
    def torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]

    def as_dict(self) -> dict:
        return asdict(self)


def _from_flags(machine: str, flags: set[str]) -> CpuBf16 | None:
    """A verdict the flags settle; None where they are ambiguous (then we measure)."""
    if not flags:
        return None
    native = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if native:
        return CpuBf16(True, True, "flags", f"native bf16 instructions ({', '.join(native)})")
    if machine in ("x86_64", "AMD64", "i686") and "avx512f" not in flags:
        return CpuBf16(False, False, "flags", "x86 CPU without AVX-512 or AMX: torch emulates bf16 matmuls")
    return None  # avx512f without bf16 extensions, ARM (bf16 / sve flags), others: measure


def _time(fn, budget_s: float = 0.02, reps: int = 3) -> float:
    """Best of ``reps`` means over ~budget_s each: robust to a busy neighbour on a shared machine."""
    fn()
    best = float("inf")
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= budget_s / reps or n >= 200:
                break
        best = min(best, dt / n)
    return best


def measure_cpu(threads: int | None = None) -> dict[str, float]:
    """Seconds per matmul call by ``dtype/rows``: the train shape and decode steps of 1..8 rows."""
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        out: dict[str, float] = {}
        g = torch.Generator().manual_seed(0)
        for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            m, k, n = TRAIN_SHAPE
            a, w = torch.randn(m, k, generator=g).to(dt), torch.randn(n, k, generator=g).to(dt)
            with torch.no_grad():
                out[f"{name}/{m}"] = _time(lambda a=a, w=w: torch.nn.functional.linear(a, w))
                _, k, n = DECODE_SHAPE
                w = torch.randn(n, k, generator=g).to(dt)
                for rows in GEN_BATCHES:
                    a = torch.randn(rows, k, generator=g).to(dt)
                    out[f"{name}/{rows}"] = _time(lambda a=a, w=w: torch.nn.functional.linear(a, w))
        return out
    finally:
        torch.set_num_threads(old)


def _verdict_from_timings(t: dict[str, float]) -> CpuBf16:
    m = TRAIN_SHAPE[0]
    train_ratio = t[f"fp32/{m}"] / t[f"bf16/{m}"]
    decode_ratio = t["fp32/1"] / t["bf16/1"]
    return CpuBf16(
        train_ratio >= BF16_WIN, decode_ratio >= BF16_WIN, "probe",
        f"measured bf16 vs fp32: {train_ratio:.2f}x on a {m}-row matmul, {decode_ratio:.2f}x on a decode step",
        {k: round(v, 7) for k, v in t.items()},
    )


def _cache_file(model: str, flags: set[str]) -> Path:
    import torch

    key = json.dumps([model, sorted(flags), platform.machine(), torch.__version__, torch.get_num_threads(),
                      TRAIN_SHAPE, DECODE_SHAPE, GEN_BATCHES])
    return Path.home() / ".cache" / "edgetune" / f"precision-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _probe_keys() -> set[str]:
    return {f"{d}/{r}" for d in ("fp32", "bf16") for r in (TRAIN_SHAPE[0], *GEN_BATCHES)}


@lru_cache(maxsize=1)
def cpu_timings() -> dict[str, float]:
    """:func:`measure_cpu` once per machine (cached on disk; ``EDGETUNE_CPU_BF16=probe`` re-measures)."""
    model, flags = cpu_model_and_flags()
    cache = _cache_file(model, flags)
    fresh = os.environ.get(ENV_CPU_BF16, "").strip().lower() == "probe"
    if cache.is_file() and not fresh:
        try:
            t = {k: float(v) for k, v in json.loads(cache.read_text()).items()}
            if set(t) == _probe_keys():
                return t
        except (ValueError, TypeError, AttributeError):
            pass
    t = {k: round(v, 7) for k, v in measure_cpu().items()}
    try:
        from .io import write_text

        cache.parent.mkdir(parents=True, exist_ok=True)
        write_text(cache, json.dumps(t))
    except OSError:
        pass  # a read-only home only costs a re-probe next time
    return t


def _env() -> str:
    return os.environ.get(ENV_CPU_BF16, "").strip().lower()


@lru_cache(maxsize=1)
def cpu_bf16() -> CpuBf16:
    """The verdict for this CPU: the env switch, else the flags, else a (cached) micro-probe."""
    env = _env()
    if env in ("slow", "0", "no", "false"):
        return CpuBf16(False, False, "env", f"{ENV_CPU_BF16}={env}: behave as a CPU without fast bf16")
    if env in ("fast", "1", "yes", "true"):
        return CpuBf16(True, True, "env", f"{ENV_CPU_BF16}={env}: behave as a CPU with fast bf16")
    _model, flags = cpu_model_and_flags()
    if env != "probe":
        v = _from_flags(platform.machine(), flags)
        if v is not None:
            return v
    from .hardware import has_module

    if not has_module("torch"):
        return CpuBf16(False, False, "flags", "torch not installed: nothing to measure, fp32 assumed")
    return _verdict_from_timings(cpu_timings())


def _torch_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


_NAMES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}


def _per_request(t: dict[str, float], dtype: str, b: int) -> float:
    """Seconds per nominal request when ``b`` requests are generated together, from the probe.

    Prefill: b x NOMINAL_PROMPT rows at the train-shape rate. Decode: NOMINAL_NEW steps of b rows,
    each streaming the weights once (memory-bound while b is small, compute-bound past that).
    Measured with the demo model on an AVX2 EPYC in fp32: 8.5 tok/s at batch 1, 17 at 4, 30 at 8.
    """
    m = TRAIN_SHAPE[0]
    prefill = b * NOMINAL_PROMPT * t[f"{dtype}/{m}"] / m
    decode = NOMINAL_NEW * t[f"{dtype}/{b}"]
    return (prefill + decode) / b


def gen_batch(t: dict[str, float], dtype: str) -> int:
    """Rows per generation call that make a nominal request cheapest in ``dtype``."""
    return min(GEN_BATCHES, key=lambda b: _per_request(t, dtype, b))


def decide(workload: str, device: str | None = None, requested: str | None = "auto") -> Decision:
    """The compute dtype (and for ``generate`` the batch size) of ``workload`` on ``device``.

    ``workload``: ``train`` (autocast dtype; weights stored in it), ``generate`` (the hf runner's
    weights for generation and logits), ``score`` (teacher-forced logits only).
    """
    if workload not in ("train", "generate", "score"):
        raise ValueError(f"unknown workload {workload!r}")
    device = (device or _torch_device()).split(":")[0]  # "cuda:1" decides as "cuda"
    batch = 8 if workload == "generate" else None  # GPUs and MPS batch for free
    if requested and requested != "auto":
        name = _NAMES.get(requested)
        if name is None:
            raise ValueError(f"unknown dtype {requested!r}")
        if device == "cpu" and workload == "generate" and name in ("fp32", "bf16"):
            batch = gen_batch(cpu_timings(), name)
        return Decision(device, workload, name, "asked for explicitly", batch)
    if device == "cuda":
        import torch

        if torch.cuda.is_bf16_supported():
            return Decision(device, workload, "bf16", "CUDA GPU with bf16 support", batch)
        return Decision(device, workload, "fp16", "CUDA GPU without bf16 (pre-Ampere): fp16", batch)
    if device == "mps":
        if workload == "train":
            return Decision(device, workload, "fp32", "Apple GPU through torch MPS: fp32 trains dependably there")
        return Decision(device, workload, "fp16", "Apple GPU through torch MPS: fp16 inference halves the bytes", batch)
    v = cpu_bf16()
    if workload in ("train", "score"):
        return Decision(device, workload, "bf16" if v.fast_train else "fp32", v.reason)
    if _forced():  # the switch fixes the dtype; the batch is still measured for it
        dtype = "bf16" if v.fast_train else "fp32"
        return Decision(device, workload, dtype, v.reason, gen_batch(cpu_timings(), dtype))
    # generate: prefill is a big matmul, decode a thin one; price a nominal request in both dtypes
    t = cpu_timings()
    best = min(("fp32", "bf16"), key=lambda d: _request_cost(t, d))
    b = gen_batch(t, best)
    return Decision(device, workload, best,
                    f"{v.reason}; measured: a nominal request is cheapest in {best} at batch {b}", b)


def _forced() -> bool:
    return cpu_bf16().source == "env"


def _request_cost(t: dict[str, float], dtype: str) -> float:
    return _per_request(t, dtype, gen_batch(t, dtype))


def summary() -> dict:
    """What doctor prints: the CPU verdict and each workload's decision on each torch device here."""
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + \
        (["mps"] if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else [])
    return {
        "cpu_bf16": cpu_bf16().as_dict(),
        "devices": {d: {w: decide(w, d).as_dict() for w in ("train", "generate", "score")} for d in devices},
    }
