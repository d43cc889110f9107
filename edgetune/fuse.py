"""Merge a LoRA / DoRA adapter (PEFT or MLX format) into its base model: an HF folder out.

Works with numpy only: base and adapter are read from safetensors one tensor at a time
(:mod:`edgetune.tensors`), each adapted weight is merged in float32 and cast back to the
base's dtype (bf16 normally). So a Mac user with only ``[mlx]`` and no torch can fuse, and peak
memory is one weight matrix, not the model.

A QLoRA adapter is merged into the original bf16 base (the folder it was trained from), never into
4-bit weights: a base folder that holds quantized weights is refused with that fix.

Math (ΔW = scale · B @ A, B: out×r, A: r×in):
  LoRA  W' = W + ΔW                       scale = alpha / r (PEFT; alpha / sqrt(r) with rsLoRA),
                                           ``lora_parameters.scale`` (mlx-lm)
  DoRA  W' = m / ||W + ΔW||_row ⊙ (W + ΔW)  (PEFT ``lora_magnitude_vector``, mlx-lm ``.m``)
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .arch import read_config
from .errors import EdgetuneError, UnsupportedError
from .io import atomic_dir, read_json, write_json
from .tensors import SafetensorsReader, SafetensorsWriter, from_float32

# Files copied from the base folder next to the fused weights (tokenizer, chat template, configs).
COPY_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
)


@dataclass
class LoraLayer:
    module: str  # module path in the base, e.g. "model.layers.0.self_attn.q_proj"
    A: np.ndarray  # r × in, float32
    B: np.ndarray  # out × r, float32
    scale: float
    magnitude: np.ndarray | None = None  # DoRA m, (out,)

    def delta(self) -> np.ndarray:
        return (self.B * np.float32(self.scale)) @ self.A


@dataclass
class Adapter:
    path: Path
    format: str  # "peft" | "mlx"
    dora: bool
    layers: dict[str, LoraLayer]
    replaced: dict[str, tuple[np.ndarray, str]] = field(default_factory=dict)  # full tensors (modules_to_save)
    config: dict = field(default_factory=dict)
    rank: int = 0
    alpha: float = 0.0

    @property
    def base_hint(self) -> str | None:
        return self.config.get("base_model_name_or_path") or self.config.get("model")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT rank_pattern / alpha_pattern: a key matches a module name suffix (or as a regex)."""
    for pat, val in (patterns or {}).items():
        if module == pat or module.endswith("." + pat) or re.fullmatch(rf"(.*\.)?{pat}", module):
            return val
    return default


def _load_peft(path: Path) -> Adapter:
    cfg = read_json(path / "adapter_config.json")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UnsupportedError(f"PEFT adapter type {cfg.get('peft_type')} cannot be fused.", where=str(path), fix="use a LoRA or DoRA adapter")
    if cfg.get("fan_in_fan_out"):
        raise UnsupportedError("fan_in_fan_out adapters (GPT-2 Conv1D) are not supported.", where=str(path / "adapter_config.json"))
    if cfg.get("lora_bias"):
        raise UnsupportedError("Adapters with lora_bias are not supported.", where=str(path / "adapter_config.json"))
    wfile = path / "adapter_model.safetensors"
    if not wfile.exists():
        raise EdgetuneError(
            f"No adapter_model.safetensors in {path}.",
            where=str(path),
            fix="save the adapter with save_pretrained(safe_serialization=True); adapter_model.bin is not read",
        )
    rd = SafetensorsReader(wfile)
    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", r_default))
    rslora = bool(cfg.get("use_rslora"))
    parts: dict[str, dict[str, np.ndarray]] = {}
    replaced: dict[str, tuple[np.ndarray, str]] = {}
    for key in rd.names():
        name = key[len("base_model.model.") :] if key.startswith("base_model.model.") else key
        m = re.match(r"(.+)\.(lora_A|lora_B)(?:\.default)?\.weight$", name) or re.match(r"(.+)\.(lora_magnitude_vector)(?:\.default)?(?:\.weight)?$", name)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = rd.load_f32(key)
        elif "lora_embedding" in name:
            raise UnsupportedError("LoRA on embedding layers cannot be fused yet.", where=str(wfile), fix="target linear layers only")
        else:  # modules_to_save: a full replacement tensor
            name = name.replace(".modules_to_save.default", "")
            replaced[name] = (rd.load(key), rd.refs[key].dtype)
    layers = {}
    for module, p in parts.items():
        if "lora_A" not in p or "lora_B" not in p:
            raise EdgetuneError(f"Adapter tensors for {module} are incomplete (need lora_A and lora_B).", where=str(wfile))
        r = p["lora_A"].shape[0]
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, alpha_default))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        layers[module] = LoraLayer(module, p["lora_A"], p["lora_B"], scale, p.get("lora_magnitude_vector"))
    dora = bool(cfg.get("use_dora")) or any(layer.magnitude is not None for layer in layers.values())
    return Adapter(path, "peft", dora, layers, replaced, cfg, r_default, alpha_default)


def _load_mlx(path: Path) -> Adapter:
    cfg = read_json(path / "adapter_config.json")
    kind = cfg.get("fine_tune_type") or ("dora" if cfg.get("use_dora") else "lora")
    if kind not in ("lora", "dora"):
        raise UnsupportedError(f"mlx-lm fine_tune_type '{kind}' has no adapter to fuse.", where=str(path / "adapter_config.json"), fix="full fine-tunes are already a model folder")
    lp = cfg.get("lora_parameters") or {}
    scale = float(lp.get("scale", 20.0))  # mlx-lm's default scale
    rd = SafetensorsReader(path / "adapters.safetensors")
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key in rd.names():
        m = re.match(r"(.+)\.(lora_a|lora_b|m)$", key)
        if not m:
            raise UnsupportedError(f"Unexpected tensor {key} in an MLX adapter.", where=str(path / "adapters.safetensors"))
        parts.setdefault(m.group(1), {})[m.group(2)] = rd.load_f32(key)
    layers = {}
    rank = int(lp.get("rank", 8))
    for module, p in parts.items():
        # mlx-lm stores lora_a as in×r and lora_b as r×out (y = x @ a @ b)
        layers[module] = LoraLayer(module, p["lora_a"].T.copy(), p["lora_b"].T.copy(), scale, p.get("m"))
        rank = p["lora_a"].shape[1]
    return Adapter(path, "mlx", kind == "dora", layers, {}, cfg, rank, scale * rank)


def load_adapter(adapter_dir: str | Path) -> Adapter:
    """Read a PEFT (adapter_model.safetensors) or mlx-lm (adapters.safetensors) adapter folder."""
    path = Path(adapter_dir)
    if not (path / "adapter_config.json").exists():
        raise EdgetuneError(
            f"{path} is not an adapter folder (no adapter_config.json).",
            where=str(path),
            fix="pass the adapter/ folder written by 'edgetune train' (PEFT or mlx-lm format)",
        )
    if (path / "adapters.safetensors").exists():
        ad = _load_mlx(path)
    else:
        ad = _load_peft(path)
    if not ad.layers and not ad.replaced:
        raise EdgetuneError(f"The adapter in {path} has no LoRA weights.", where=str(path))
    return ad


def _check_base(base_dir: Path) -> dict:
    cfg_path = base_dir / "config.json"
    cfg = read_config(base_dir)
    qc = cfg.get("quantization_config")
    if qc:
        raise UnsupportedError(
            f"The base in {base_dir} holds {qc.get('quant_method', 'quantized')} weights; an adapter is never merged into quantized weights.",
            where=str(cfg_path),
            fix="pass the original bf16/fp16 base folder the QLoRA adapter was trained from (--base)",
        )
    return cfg


def merge_weight(w: np.ndarray, layer: LoraLayer, where: str) -> np.ndarray:
    """float32 W (out×in) + adapter -> merged float32."""
    if layer.B.shape[0] != w.shape[0] or layer.A.shape[1] != w.shape[1]:
        raise EdgetuneError(
            f"Adapter for {layer.module} has shape {layer.B.shape[0]}×{layer.A.shape[1]} but the base weight is {w.shape[0]}×{w.shape[1]}.",
            where=where,
            fix="fuse into the base model the adapter was trained on",
        )
    merged = w + layer.delta()
    if layer.magnitude is not None:
        norm = np.linalg.norm(merged, axis=1)
        merged *= (layer.magnitude.reshape(-1) / np.maximum(norm, 1e-12))[:, None]
    return merged


def trained_chat_template(adapter_dir, chat_template: str | None = None) -> str | None:
    """The chat template the adapter was trained with: ``chat_template`` (file or family name) when
    given, else the ``chat_template.jinja`` that training keeps beside the adapter, else None (the base's)."""
    if chat_template:
        from .data.template import resolve_chat_template

        return resolve_chat_template(chat_template)
    kept = Path(adapter_dir) / "chat_template.jinja"
    return kept.read_text(encoding="utf-8") if kept.is_file() else None


def _write_chat_template(folder: Path, template: str) -> None:
    """Make ``template`` the folder's chat template for transformers and the GGUF converter alike."""
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    (folder / "chat_template.json").unlink(missing_ok=True)
    tc = folder / "tokenizer_config.json"
    if tc.exists():
        data = json.loads(tc.read_text(encoding="utf-8"))
        data["chat_template"] = template
        write_json(tc, data)


def fuse(base_dir, adapter_dir, out_dir, *, chat_template: str | None = None, show_progress: bool = True) -> Path:
    """Merge ``adapter_dir`` into ``base_dir`` and save a standard HF folder at ``out_dir``.

    The fused folder's chat template is the one the adapter was trained with (see
    :func:`trained_chat_template`), so a model tuned with ``--chat-template`` keeps it."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    cfg = _check_base(base_dir)
    ad = load_adapter(adapter_dir)
    template = trained_chat_template(adapter_dir, chat_template)
    rd = SafetensorsReader(base_dir)
    missing = [m for m in ad.layers if f"{m}.weight" not in rd]
    missing += [n for n in ad.replaced if n not in rd]
    if missing:
        raise EdgetuneError(
            f"The adapter targets {len(missing)} layer(s) the base does not have (e.g. {missing[0]}).",
            where=str(adapter_dir),
            fix="fuse into the base model the adapter was trained on",
        )
    plan = [(name, ref.dtype, ref.shape) for name, ref in rd.refs.items()]
    from .console import progress

    with atomic_dir(out_dir) as tmp:
        with SafetensorsWriter(tmp / "model.safetensors", plan) as wr, progress(transient=True) as bar:
            task = bar.add_task("fuse", total=len(plan), visible=show_progress)
            for name, st_dtype, _shape in plan:
                module = name[: -len(".weight")] if name.endswith(".weight") else None
                if module in ad.layers:
                    merged = merge_weight(rd.load_f32(name), ad.layers[module], str(adapter_dir))
                    wr.write(name, from_float32(merged, st_dtype))
                    del merged
                elif name in ad.replaced:
                    arr, dt = ad.replaced[name]
                    wr.write(name, arr if dt == st_dtype else from_float32(arr.astype(np.float32), st_dtype))
                else:
                    wr.write(name, rd.load(name))
                bar.advance(task)
        cfg.pop("quantization_config", None)
        write_json(tmp / "config.json", cfg)
        for f in COPY_FILES:
            if (base_dir / f).exists():
                shutil.copy2(base_dir / f, tmp / f)
        if template is not None:
            _write_chat_template(tmp, template)
        write_json(
            tmp / "edgetune_fuse.json",
            {
                "base": str(base_dir),
                "adapter": str(adapter_dir),
                "adapter_format": ad.format,
                "dora": ad.dora,
                "merged_layers": len(ad.layers),
                "replaced_tensors": sorted(ad.replaced),
                "chat_template": "from training" if template is not None else "base model's",
            },
        )
    return out_dir


def adapter_summary(adapter_dir) -> dict:
    ad = load_adapter(adapter_dir)
    return {"format": ad.format, "dora": ad.dora, "layers": len(ad.layers), "rank": ad.rank, "base": ad.base_hint}


__all__ = ["fuse", "load_adapter", "Adapter", "LoraLayer", "merge_weight", "adapter_summary"]
