"""llama.cpp through llama-cpp-python, the way edgetune measures with it: load a GGUF for teacher-forced
logits (without the repacked weight copy, see :func:`measure_repack`), read the logits, and keep
llama.cpp's C-side logging quiet.

A bottom-layer module: export verification, quantization, the eval stage's ``gguf:`` runner and the
demo model's check all load GGUFs through it, and it imports nothing of edgetune's but the errors.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import EdgetuneError, MissingDependencyError


# llama.cpp's CPU backend may copy quantized weights (q4_0, q4_K, iq4_nl) into "repacked" buffers
# for faster kernels: a second, anonymous copy of the model beside the mmapped file (0.45 GB for a
# 1.2B q4_k_m; 4+ GB at 8B) that bought no prefill speed where measured (1.2B q4_k_m, 200 tokens,
# 2.43 s vs 2.45 s). The contexts that *measure* (verification, drift, --quant auto, scoring) load
# without it so the weights stay page cache; generation and serving keep llama.cpp's default.
# EDGETUNE_LLAMA_REPACK=1 measures with it (logits then come from the repacked kernels).
def measure_repack() -> bool:
    return os.environ.get("EDGETUNE_LLAMA_REPACK", "0") == "1"


@contextmanager
def model_params(repack: bool):
    """llama-cpp-python's ``Llama`` takes no ``use_extra_bufts``: while the context is open, the
    default model parameters it starts from carry ``repack``."""
    import llama_cpp.llama_cpp as C

    orig = C.llama_model_default_params
    if repack:
        yield
        return

    def params():
        p = orig()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p

    C.llama_model_default_params = params
    try:
        yield
    finally:
        C.llama_model_default_params = orig


def load_llama(gguf_path, *, lora_path=None, n_ctx: int = 512, logits_all: bool = True, repack: bool | None = None):
    """A llama.cpp model for measuring (``repack`` None: :func:`measure_repack`)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise MissingDependencyError("llama-cpp-python", "llama", "Verifying a GGUF with llama.cpp") from None

    kw = {"lora_path": str(lora_path)} if lora_path else {}
    try:
        with model_params(measure_repack() if repack is None else repack):
            return Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=2, verbose=False, logits_all=logits_all, **kw)
    except ValueError as exc:
        raise EdgetuneError(
            f"llama.cpp could not load {Path(gguf_path).name}{' with adapter ' + Path(lora_path).name if lora_path else ''}: {exc}",
            where=str(gguf_path),
            fix="run with verbose llama.cpp logs to see why (the file may target an architecture this llama.cpp build lacks)",
        ) from None


def gguf_logits(llm, token_lists: list[list[int]]) -> list[np.ndarray]:
    out = []
    for ids in token_lists:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    return out


def quiet(verbose: bool):
    """llama.cpp prints one line per tensor from C; hide it unless asked."""
    import contextlib

    if verbose:
        return contextlib.nullcontext()
    try:
        from llama_cpp._utils import suppress_stdout_stderr

        return suppress_stdout_stderr(disable=False)
    except (ImportError, TypeError):
        return contextlib.nullcontext()
