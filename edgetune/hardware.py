"""Cheap probes of what this machine has. Nothing here imports torch or mlx at module load."""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
from dataclasses import asdict, dataclass, field
from functools import lru_cache

GB = 1e9
FIT_MARGIN = 0.9  # of the memory on offer: the OS, the page cache and the user's other programs need the rest


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


@dataclass
class Hardware:
    os: str
    machine: str
    cpu_count: int
    apple_silicon: bool
    torch: str | None = None
    cuda: bool = False
    cuda_devices: list[dict] = field(default_factory=list)
    mps: bool = False
    bitsandbytes: str | None = None
    mlx: str | None = None
    mlx_lm: str | None = None
    mlx_device: str | None = None
    peft: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo; ARM's 'Features' line counts as flags."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, val = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model") and not model:
                    model = val.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


@lru_cache(maxsize=1)
def probe() -> Hardware:
    hw = Hardware(
        os=f"{platform.system()} {platform.release()}",
        machine=platform.machine(),
        cpu_count=os.cpu_count() or 1,
        apple_silicon=is_apple_silicon(),
    )
    if has_module("torch"):
        import torch

        hw.torch = torch.__version__
        hw.cuda = bool(torch.cuda.is_available())
        if hw.cuda:
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                hw.cuda_devices.append({"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1)})
        hw.mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    hw.peft = _version("peft")
    if hw.cuda and has_module("bitsandbytes"):
        hw.bitsandbytes = _version("bitsandbytes")
    elif has_module("bitsandbytes"):
        hw.bitsandbytes = _version("bitsandbytes")
    hw.mlx = _version("mlx")
    hw.mlx_lm = _version("mlx-lm") or _version("mlx_lm")
    if hw.mlx:
        try:
            import mlx.core as mx

            hw.mlx_device = str(mx.default_device())
        except Exception:  # noqa: BLE001 - a broken mlx install is reported, not fatal
            hw.mlx_device = None
    return hw


def free_disk_gb(path: str = ".") -> float:
    return shutil.disk_usage(path).free / 1e9


def memory_gb() -> tuple[float, float]:
    """(total, available) system memory in GB."""
    import psutil

    vm = psutil.virtual_memory()
    return vm.total / 1e9, vm.available / 1e9


def require_free_disk(path, need_bytes: float, what: str, fix: str) -> None:
    """Refuse before writing ``what`` (~``need_bytes``) into the folder of ``path`` when the disk there
    has less free space (with 5% and 100 MB to spare); the error names both numbers and ``fix``."""
    from pathlib import Path

    from .errors import EdgetuneError

    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need_bytes * 1.05 + 100e6 > free:
        raise EdgetuneError(
            f"Not enough disk space for {what}: ~{need_bytes / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free at {folder}.",
            where=str(Path(path)), fix=fix)
