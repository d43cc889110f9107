"""`edgetune doctor`: what this machine can do, and which backend `auto` picks and why."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

from .hardware import cpu_model_and_flags, free_disk_gb, has_module, memory_gb, probe

# Runs in a child process: a llama.cpp build with bad CPU flags dies with SIGSEGV on a batched
# prompt (seen with the default native build on AMX CPUs), which must not take doctor down.
_LLAMA_PROBE = r"""
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_batch=64, n_threads=2, verbose=False)
toks = llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 4)
llm.eval(toks)
print("OK", len(toks))
"""


def _llama_cpp() -> dict:
    info: dict = {"installed": has_module("llama_cpp")}
    if not info["installed"]:
        info["hint"] = "pip install llama-cpp-python (see the Makefile for the CPU build flags)"
        return info
    from importlib.metadata import version

    info["version"] = version("llama-cpp-python")
    from .demo_model import locate_gguf

    try:
        gguf = locate_gguf(download=False)
    except Exception:  # noqa: BLE001 - no GGUF here means "not checked", not a failure
        info["batched_prompt_ok"] = None
        info["batched_prompt_note"] = "not checked: no GGUF available (run 'edgetune models fetch-demo')"
        return info
    try:
        proc = subprocess.run([sys.executable, "-c", _LLAMA_PROBE, str(gguf)], capture_output=True, text=True, timeout=120)
        ok = proc.returncode == 0 and proc.stdout.startswith("OK")
        info["batched_prompt_ok"] = ok
        if not ok:
            info["batched_prompt_note"] = (
                f"a batched prompt failed (exit {proc.returncode}); rebuild llama-cpp-python with "
                'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"'
            )
    except subprocess.TimeoutExpired:
        info["batched_prompt_ok"] = False
        info["batched_prompt_note"] = "a batched prompt did not finish in 120 s"
    return info


def _ollama() -> dict:
    from .ollama_client import OllamaClient

    path = shutil.which("ollama")
    client = OllamaClient(timeout=1.0)  # the server $OLLAMA_HOST names, as the eval runner and ollama --create see it
    info = {"on_path": bool(path), "path": path, "host": client.base_url, "server_reachable": False}
    try:
        info["server_version"] = client.version()
        info["server_reachable"] = True
    except Exception:  # noqa: BLE001 - unreachable is an answer, not an error
        pass
    return info


def collect(check_llama: bool = True) -> dict:
    from .precision import cpu_bf16
    from .train.select import choose_backend

    hw = probe()
    total, avail = memory_gb()
    info: dict = {
        "os": hw.os,
        "machine": hw.machine,
        "python": platform.python_version(),
        "cpu": {"count": hw.cpu_count, "model": cpu_model_and_flags()[0], "bf16_fast": bool(hw.torch) and cpu_bf16().fast_train},
        "apple_silicon": hw.apple_silicon,
        "mlx": {"mlx": hw.mlx, "mlx_lm": hw.mlx_lm, "device": hw.mlx_device},
        "torch": {"version": hw.torch, "cuda": hw.cuda, "gpus": hw.cuda_devices, "mps": hw.mps, "peft": hw.peft},
        "bitsandbytes": hw.bitsandbytes,
        "llama_cpp": _llama_cpp() if check_llama else {"installed": has_module("llama_cpp")},
        "ollama": _ollama(),
        "disk": {"path": str(Path.cwd()), "free_gb": round(free_disk_gb("."), 1)},
        "memory": {"total_gb": round(total, 1), "available_gb": round(avail, 1)},
    }
    if hw.torch:
        from .precision import summary

        # the compute dtype each torch workload gets on each device here, and why (edgetune.precision)
        info["precision"] = summary()
    try:
        choice = choose_backend("auto", "lora", hw)
        info["auto_backend"] = {"backend": choice.backend, "device": choice.device, "reason": choice.reason}
    except Exception as exc:  # noqa: BLE001 - reported, doctor must still print everything else
        info["auto_backend"] = {"backend": None, "device": None, "reason": str(exc)}
    info["qlora"] = (
        "torch + bitsandbytes on CUDA" if hw.cuda and hw.bitsandbytes
        else "MLX quantized-base LoRA" if hw.mlx and hw.mlx_lm
        else "not available here (needs CUDA + bitsandbytes, or MLX)"
    )
    return info


def render(info: dict) -> None:
    from rich.table import Table

    from .console import out

    def yes(v) -> str:
        return "[green]yes[/]" if v else "[dim]no[/]"

    t = Table(title="edgetune doctor", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("OS / CPU", f"{info['os']} {info['machine']}, {info['cpu']['count']} cores, {info['cpu']['model']}")
    t.add_row("Python", info["python"])
    t.add_row("Apple Silicon", yes(info["apple_silicon"]))
    mlx = info["mlx"]
    t.add_row("MLX", f"mlx {mlx['mlx']}, mlx-lm {mlx['mlx_lm']}, device {mlx['device']}" if mlx["mlx"] else yes(False))
    tor = info["torch"]
    if tor["version"]:
        gpus = ", ".join(f"{g['name']} ({g['memory_gb']} GB)" for g in tor["gpus"]) or "none"
        t.add_row("torch", f"{tor['version']} (peft {tor['peft']}); CUDA: {gpus}; MPS: {yes(tor['mps'])}; fast CPU bf16: {yes(info['cpu']['bf16_fast'])}")
    else:
        t.add_row("torch", "not installed (pip install 'edgetune[torch]')")
    t.add_row("bitsandbytes", info["bitsandbytes"] or "not installed")
    lc = info["llama_cpp"]
    if lc.get("installed"):
        ok = lc.get("batched_prompt_ok")
        status = "[green]batched prompt OK[/]" if ok else "[red]batched prompt FAILED[/]" if ok is False else "[dim]not checked[/]"
        t.add_row("llama-cpp-python", f"{lc.get('version')} — {status}" + (f" ({lc['batched_prompt_note']})" if lc.get("batched_prompt_note") else ""))
    else:
        t.add_row("llama-cpp-python", "[red]not installed[/]")
    ol = info["ollama"]
    t.add_row("ollama", f"on PATH: {yes(ol['on_path'])}; server at {ol['host']}: {yes(ol['server_reachable'])}")
    t.add_row("disk free", f"{info['disk']['free_gb']} GB ({info['disk']['path']})")
    t.add_row("memory", f"{info['memory']['available_gb']} GB available of {info['memory']['total_gb']} GB")
    t.add_row("QLoRA", info["qlora"])
    prec = info.get("precision")
    if prec:
        v = prec["cpu_bf16"]
        t.add_row("CPU bf16", f"{'[green]fast[/]' if v['fast_train'] else '[yellow]slow[/]'} ({v['source']}: {v['reason']})")
        for dev, by_work in prec["devices"].items():
            parts = []
            for work, d in by_work.items():
                parts.append(f"{work} {d['dtype']}" + (f" x{d['batch_size']}" if d.get("batch_size") else ""))
            t.add_row(f"precision ({dev})", ", ".join(parts))
    ab = info["auto_backend"]
    t.add_row("auto backend", f"[bold cyan]{ab['backend']}[/] on {ab['device']} — {ab['reason']}")
    out.print(t)
