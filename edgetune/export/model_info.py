"""What the Modelfile needs to know about a model, from its HF folder or its GGUF's metadata.

Chat template, BOS/EOS tokens and whether the tokenizer adds BOS, extra end-of-turn tokens,
context length, generation defaults and license: the HF folder (``tokenizer_config.json``,
``generation_config.json``, ...) when given, else the GGUF's ``tokenizer.*`` / ``general.*`` keys.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgetuneError
from ..io import read_json


@dataclass
class ModelInfo:
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    extra_eos: list[str] = field(default_factory=list)  # more end tokens (generation_config / GGUF eot)
    add_bos: bool | None = None
    context_length: int | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    license: str | None = None
    source: str = ""
    tokenizer_dir: Path | None = None


def _tok_text(v: Any) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v


def info_from_hf(model_dir: str | os.PathLike) -> ModelInfo:
    d = Path(model_dir)
    if not d.is_dir():
        raise EdgetuneError(f"Model folder not found: {d}", where=str(d), exit_code=2)
    info = ModelInfo(source=str(d))
    tc = read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").exists() else {}
    stm = read_json(d / "special_tokens_map.json") if (d / "special_tokens_map.json").exists() else {}
    tmpl = tc.get("chat_template")
    if isinstance(tmpl, list):  # named templates: take "default"
        tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), tmpl[0]["template"] if tmpl else None)
    if (d / "chat_template.jinja").exists():
        tmpl = (d / "chat_template.jinja").read_text(encoding="utf-8")
    elif not tmpl and (d / "chat_template.json").exists():
        tmpl = read_json(d / "chat_template.json").get("chat_template")
    info.chat_template = tmpl
    info.bos_token = _tok_text(tc.get("bos_token")) or _tok_text(stm.get("bos_token"))
    info.eos_token = _tok_text(tc.get("eos_token")) or _tok_text(stm.get("eos_token"))
    if "add_bos_token" in tc:
        info.add_bos = bool(tc["add_bos_token"])
    if (d / "tokenizer.json").exists() or (d / "tokenizer.model").exists():
        info.tokenizer_dir = d
    id_to_text: dict[int, str] = {}
    if (d / "tokenizer.json").exists():
        try:
            for t in read_json(d / "tokenizer.json").get("added_tokens", []):
                id_to_text[t["id"]] = t["content"]
        except EdgetuneError:
            pass
    cfg = read_json(d / "config.json") if (d / "config.json").exists() else {}
    info.context_length = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    gen = read_json(d / "generation_config.json") if (d / "generation_config.json").exists() else {}
    for key in ("temperature", "top_p", "top_k", "repetition_penalty", "do_sample"):
        if gen.get(key) is not None:
            info.generation[key] = gen[key]
    eos_ids = gen.get("eos_token_id")
    for i in eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else []:
        if i in id_to_text:
            info.extra_eos.append(id_to_text[i])
    lic, named = license_file(d), readme_metadata(d).get("license")
    if lic is not None:
        info.license = lic.read_text(encoding="utf-8", errors="replace").strip()
    elif isinstance(named, str):
        info.license = named
    return info


LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md")


def license_file(model_dir: str | os.PathLike) -> Path | None:
    """The model folder's license file (LICENSE, LICENSE.txt or LICENSE.md), if it has one."""
    return next((Path(model_dir) / n for n in LICENSE_FILES if (Path(model_dir) / n).is_file()), None)


def readme_metadata(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The YAML front matter of the folder's README.md (a Hugging Face model card's metadata:
    ``license``, ``base_model``, ``tags`` ...); {} when there is none or it is not valid YAML."""
    readme = Path(model_dir) / "README.md"
    if not readme.is_file():
        return {}
    m = re.match(r"---[ \t]*\r?\n(.*?)^---[ \t]*$", readme.read_text(encoding="utf-8", errors="replace"), re.M | re.S)
    if not m:
        return {}
    import yaml

    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


_GGUF_CACHE: dict[tuple, dict] = {}


def _gguf_meta(path: Path) -> dict[str, Any]:
    """The metadata a Modelfile needs from a GGUF (cached per file and mtime), read with the fast
    header reader: gguf-py's GGUFReader decodes every value and takes seconds on a 50k-token vocab."""
    from gguf import Keys

    from .gguf_info import read_metadata

    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _GGUF_CACHE:
        if len(_GGUF_CACHE) >= 4:
            _GGUF_CACHE.pop(next(iter(_GGUF_CACHE)))
        t = Keys.Tokenizer
        try:
            meta = read_metadata(path, [t.CHAT_TEMPLATE, t.BOS_ID, t.EOS_ID, t.EOT_ID, t.EOM_ID, t.ADD_BOS, t.LIST,
                                        Keys.General.ARCHITECTURE, Keys.General.LICENSE])
            arch = meta.get(Keys.General.ARCHITECTURE)
            if arch:
                meta |= read_metadata(path, [Keys.LLM.CONTEXT_LENGTH.format(arch=arch)])
        except Exception as exc:  # noqa: BLE001 - any parse failure means "not a GGUF we can read"
            raise EdgetuneError(f"Cannot read GGUF metadata: {exc}", where=str(path), exit_code=2) from None
        _GGUF_CACHE[key] = meta
    return _GGUF_CACHE[key]


def info_from_gguf(gguf_path: str | os.PathLike) -> ModelInfo:
    from gguf import Keys

    p = Path(gguf_path)
    if not p.exists():
        raise EdgetuneError(f"GGUF file not found: {p}", where=str(p), exit_code=2)
    meta = _gguf_meta(p)
    t = Keys.Tokenizer
    tokens = meta.get(t.LIST) or []

    def token(key: str) -> str | None:
        i = meta.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    info = ModelInfo(source=str(p))
    info.chat_template = meta.get(t.CHAT_TEMPLATE)
    info.bos_token, info.eos_token = token(t.BOS_ID), token(t.EOS_ID)
    info.extra_eos = [x for x in (token(t.EOT_ID), token(t.EOM_ID)) if x]
    ab = meta.get(t.ADD_BOS)
    info.add_bos = None if ab is None else bool(ab)
    arch = meta.get(Keys.General.ARCHITECTURE)
    if arch:
        info.context_length = meta.get(Keys.LLM.CONTEXT_LENGTH.format(arch=arch))
    info.license = meta.get(Keys.General.LICENSE)
    return info


def model_info(gguf_path: str | os.PathLike | None, model_dir: str | os.PathLike | None) -> ModelInfo:
    """Chat template etc. from the HF folder when given, else from the GGUF's metadata.

    ``add_bos`` always prefers the GGUF: it is what llama.cpp (and so Ollama) will do.
    """
    g = info_from_gguf(gguf_path) if gguf_path and Path(gguf_path).exists() else None
    if model_dir:
        info = info_from_hf(model_dir)
        if g is not None:
            if g.add_bos is not None:
                info.add_bos = g.add_bos
            info.context_length = info.context_length or g.context_length
            info.license = info.license or g.license
            info.extra_eos += [t for t in g.extra_eos if t not in info.extra_eos]
    elif g is not None:
        info = g
    else:
        raise EdgetuneError(f"GGUF file not found: {gguf_path}", where=str(gguf_path), exit_code=2)
    if info.add_bos is None and info.tokenizer_dir is not None:
        tok = cached_tokenizer(info.tokenizer_dir)
        ids = tok("a", add_special_tokens=True)["input_ids"]
        info.add_bos = bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id
    if info.add_bos is None:
        info.add_bos = False
    return info


_TOKENIZERS: dict[str, Any] = {}


def cached_tokenizer(d: Path):
    """The HF tokenizer in ``d``, loaded once per folder (offline)."""
    key = str(Path(d).resolve())
    if key not in _TOKENIZERS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        _TOKENIZERS[key] = AutoTokenizer.from_pretrained(str(d))
    return _TOKENIZERS[key]

