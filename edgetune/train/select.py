"""Choose the training backend and device; refuse unsupported combinations before loading anything.

Dispatch order (first match wins), as ``auto`` resolves it:
1. Apple Silicon with mlx + mlx-lm            -> mlx
2. torch with CUDA                             -> torch on cuda (QLoRA-capable with bitsandbytes)
3. torch with MPS                              -> torch on mps
4. torch                                       -> torch on cpu
5. mlx (e.g. mlx[cpu] on Linux) without torch  -> mlx on cpu
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedError
from ..hardware import Hardware, probe


@dataclass(frozen=True)
class Choice:
    backend: str  # mlx|torch
    device: str  # cpu|cuda|mps|gpu (mlx metal)
    reason: str


def _what_works(hw: Hardware) -> str:
    options = []
    if hw.torch:
        options.append("--backend torch --method lora|dora" + ("|qlora" if hw.cuda and hw.bitsandbytes else ""))
    if hw.mlx and hw.mlx_lm:
        options.append("--backend mlx --method lora|dora|qlora")
    return "; ".join(options) or "install a backend: pip install 'edgetune[torch]' (or 'edgetune[mlx]' on a Mac)"


def choose_backend(backend: str = "auto", method: str = "lora", hw: Hardware | None = None) -> Choice:
    hw = hw or probe()
    has_mlx = bool(hw.mlx and hw.mlx_lm)
    if backend == "auto":
        if hw.apple_silicon and has_mlx:
            choice = Choice("mlx", "gpu", "Apple Silicon with mlx-lm: MLX trains on the Metal GPU with unified memory")
        elif hw.torch and hw.cuda:
            choice = Choice("torch", "cuda", f"CUDA GPU found ({hw.cuda_devices[0]['name']}): torch + PEFT, QLoRA via bitsandbytes")
        elif method == "qlora" and has_mlx:
            choice = Choice("mlx", "cpu", "qlora requested and no CUDA: MLX quantized-base LoRA")
        elif hw.torch and hw.mps:
            choice = Choice("torch", "mps", "Apple GPU through torch MPS (mlx-lm not installed)")
        elif hw.torch:
            from ..precision import decide

            d = decide("train", "cpu")
            prec = "bf16 autocast" if d.dtype == "bf16" else d.dtype
            choice = Choice("torch", "cpu", f"no GPU: torch + PEFT on CPU ({prec}: {d.reason})")
        elif has_mlx:
            choice = Choice("mlx", "cpu", "torch not installed; mlx-lm on CPU")
        else:
            raise UnsupportedError("No training backend is installed.", fix=_what_works(hw))
    elif backend == "torch":
        if not hw.torch:
            raise UnsupportedError("--backend torch needs torch, which is not installed.", fix="pip install 'edgetune[torch]'")
        device = "cuda" if hw.cuda else "mps" if hw.mps else "cpu"
        choice = Choice("torch", device, "requested --backend torch")
    elif backend == "mlx":
        if not has_mlx:
            raise UnsupportedError("--backend mlx needs mlx and mlx-lm.", fix="pip install 'edgetune[mlx]' (Linux: mlx[cpu] mlx-lm)")
        choice = Choice("mlx", "gpu" if hw.apple_silicon else "cpu", "requested --backend mlx")
    else:
        raise UnsupportedError(f"Unknown backend '{backend}'.", fix="use auto, mlx or torch")

    if method == "qlora" and choice.backend == "torch" and not (hw.cuda and hw.bitsandbytes):
        raise UnsupportedError(
            "QLoRA with the torch backend needs a CUDA GPU and bitsandbytes"
            + (" (no CUDA GPU here)." if not hw.cuda else " (bitsandbytes is not installed)."),
            fix="what works on this machine: " + _what_works(hw),
        )
    return choice
