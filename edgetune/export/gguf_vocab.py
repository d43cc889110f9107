"""GGUF tokenizer metadata from a Hugging Face folder: BPE or SentencePiece vocabulary, the
llama.cpp pre-tokenizer name, special tokens, BOS/EOS behaviour and the chat template.

Split from :mod:`edgetune.export.gguf` (the converter calls :func:`add_tokenizer`); the facts
come from llama.cpp's ``src/llama-vocab.cpp`` and each model's ``tokenizer.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import UnsupportedError
from ..io import read_json

log = logging.getLogger(__name__)



# HF pre-tokenizer (tokenizer.json "pre_tokenizer") -> llama.cpp tokenizer.ggml.pre. Keyed by a
# structural signature (see _pre_signature) rather than by model name, so any model that reuses
# a known pre-tokenizer gets the right one. Sources: llama.cpp src/llama-vocab.cpp (regexes per
# LLAMA_VOCAB_PRE_TYPE_*), and the tokenizer.json of each named model.
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[str, str] = {
    "ByteLevel(regex)": "gpt-2",  # GPT-2 regex (also SmolLM2 as re-created by transformers from GGUF)
    "Digits(individual)+ByteLevel(regex)": "smollm",  # SmolLM / SmolLM2 (hub tokenizer.json), StarCoder
    f"Split({_LLAMA3_RE})+ByteLevel": "llama-bpe",  # Llama 3.x
    f"Split({_QWEN2_RE})+ByteLevel": "qwen2",  # Qwen2 / Qwen2.5 / Qwen3
}


def _pre_signature(pre: dict | None) -> str:
    if not pre:
        return "none"
    items = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    parts = []
    for p in items:
        t = p.get("type")
        if t == "ByteLevel":
            parts.append("ByteLevel(regex)" if p.get("use_regex", True) else "ByteLevel")
        elif t == "Digits":
            parts.append("Digits(individual)" if p.get("individual_digits") else "Digits")
        elif t == "Split":
            pat = p.get("pattern", {})
            parts.append(f"Split({pat.get('Regex', pat.get('String', ''))})")
        else:
            parts.append(str(t))
    return "+".join(parts)


_TOKENIZER_PROBE = """
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
if getattr(tok, "backend_tokenizer", None) is None:
    print(json.dumps(None))
else:
    print(json.dumps({"json": tok.backend_tokenizer.to_str(), "hello": tok("hello world").input_ids}))
"""


def _hf_effective_tokenizer(model_dir: Path) -> dict | None:
    """The tokenizer transformers actually builds for this folder: ``{"json", "hello"}`` or None.

    Not tokenizer.json as written: transformers 5 picks a tokenizer class from the model type and
    that class may replace parts of the file (e.g. a qwen2 folder gets Qwen2's pre-tokenizer
    regex). The GGUF must reproduce what the trained model saw, so we read the effective one.
    transformers imports torch (~350 MB), so when it is not loaded yet the probe runs in a child
    process and the conversion itself stays at numpy + one tensor of memory.
    """
    import subprocess
    import sys

    if "transformers" in sys.modules:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(model_dir))
        except Exception:  # noqa: BLE001 - no usable fast tokenizer: fall back to the files
            return None
        if getattr(tok, "backend_tokenizer", None) is None:
            return None
        return {"json": tok.backend_tokenizer.to_str(), "hello": tok("hello world").input_ids}
    try:
        res = subprocess.run([sys.executable, "-c", _TOKENIZER_PROBE, str(model_dir)], capture_output=True, text=True, timeout=300)
        return json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 and res.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError, IndexError):
        return None


def _hf_adds_bos_eos(hello_ids: list[int] | None, bos: int | None, eos: int | None) -> tuple[bool, bool] | None:
    """Whether the HF tokenizer itself adds BOS/EOS (its post-processor), not a config flag."""
    if hello_ids is None:
        return None
    ids = hello_ids
    return (bos is not None and bool(ids) and ids[0] == bos, eos is not None and bool(ids) and ids[-1] == eos)


def _metaspace_prefix(tok_json: dict) -> bool:
    """Does the tokenizer prepend "▁" to the text (SentencePiece add_dummy_prefix)?"""
    def walk(node):
        if not isinstance(node, dict):
            return []
        found = [node]
        for key in ("pretokenizers", "normalizers"):
            for child in node.get(key) or []:
                found += walk(child)
        return found

    for n in walk(tok_json.get("pre_tokenizer")) + walk(tok_json.get("normalizer")):
        if n.get("type") == "Metaspace":
            return n.get("prepend_scheme", "always") != "never" and n.get("add_prefix_space", True)
        if n.get("type") == "Prepend" and n.get("prepend") == "▁":
            return True
    return False


def _added_tokens(model_dir: Path, tok_json: dict | None) -> dict[int, tuple[str, bool]]:
    added: dict[int, tuple[str, bool]] = {}
    for t in (tok_json or {}).get("added_tokens", []):
        added[int(t["id"])] = (t["content"], bool(t.get("special")))
    tc = model_dir / "tokenizer_config.json"
    if tc.exists():
        for k, t in (read_json(tc).get("added_tokens_decoder") or {}).items():
            added.setdefault(int(k), (t["content"], bool(t.get("special"))))
    return added


def gguf_model_name(model_dir: Path) -> str:
    """general.name for the GGUF: the folder name, unless llama.cpp would choke on it.

    llama.cpp sets Phi-3 token attributes when general.name contains "phi3" or "phi-3" and looks
    up ``<s>``, ``</s>`` and ``<unk>`` by text, throwing ``unordered_map::at`` when the vocabulary
    lacks one (a Phi-4-mini style vocab, or any other tokenizer on a folder named phi3-...).
    Such a name is written with an underscore ("phi_3") so the file loads.
    """
    import re

    name = model_dir.name
    if not re.search(r"phi-?3", name, re.IGNORECASE):
        return name
    tj = model_dir / "tokenizer.json"
    if tj.exists():
        t = json.loads(tj.read_text(encoding="utf-8"))
        v = (t.get("model") or {}).get("vocab") or {}
        vocab = set(v) if isinstance(v, dict) else {e[0] for e in v}  # BPE/WordPiece dict, Unigram list
        vocab |= {a.get("content") for a in t.get("added_tokens", [])}
        if not {"<s>", "</s>", "<unk>"} <= vocab:
            return re.sub(r"(?i)phi-?3", lambda m: m.group(0)[:3] + "_3", name)
    return name


def add_tokenizer(w, model_dir: Path, n_vocab: int) -> str:
    """Write tokenizer metadata; returns the kind written ("gpt2 BPE (pre)" or "SentencePiece")."""
    import gguf

    tj_path = model_dir / "tokenizer.json"
    hf_tok = _hf_effective_tokenizer(model_dir)
    if hf_tok is not None:
        tok_json = json.loads(hf_tok["json"])
    else:
        tok_json = json.loads(tj_path.read_text(encoding="utf-8")) if tj_path.exists() else None
    model = (tok_json or {}).get("model", {})
    added = _added_tokens(model_dir, tok_json)
    TT = gguf.TokenType

    if model.get("type") == "BPE" and not model.get("byte_fallback"):
        # GPT-2 style byte-level BPE: tokens are the byte-level strings of tokenizer.json.
        rev = {i: t for t, i in model["vocab"].items()}
        tokens, types = [], []
        for i in range(n_vocab):
            if i in added:
                text, special = added[i]
                tokens.append(text)
                types.append(TT.CONTROL if special else TT.USER_DEFINED)
            elif i in rev:
                tokens.append(rev[i])
                types.append(TT.NORMAL)
            else:  # the embedding matrix is padded past the tokenizer (common): unused rows
                tokens.append(f"[PAD{i}]")
                types.append(TT.UNUSED)
        sig = _pre_signature(tok_json.get("pre_tokenizer"))
        pre = PRE_TOKENIZERS.get(sig)
        if pre is None:
            log.warning("unknown pre-tokenizer %s; writing 'default' (verification will show any mismatch)", sig)
            pre = "default"
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        kind = f"BPE ({pre})"
        merges = True
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        # SentencePiece BPE as transformers saves it (tokenizer.json, no tokenizer.model): llama.cpp's
        # SPM tokenizer merges by score, and SentencePiece orders BPE pieces by merge order, so
        # score = -id reproduces its priorities (checked by the tokenizer verification).
        rev = {i: t for t, i in model["vocab"].items()}
        unk = model.get("unk_token")
        tokens, scores, types = [], [], []
        for i in range(n_vocab):
            if i in added:
                text, special = added[i]
                typ = TT.CONTROL if special else TT.USER_DEFINED
                if text == unk:
                    typ = TT.UNKNOWN
            elif i in rev:
                text = rev[i]
                typ = TT.BYTE if len(text) == 6 and text.startswith("<0x") and text.endswith(">") else TT.NORMAL
                if text == unk:
                    typ = TT.UNKNOWN
            else:
                text, typ = f"[PAD{i}]", TT.UNUSED
            tokens.append(text)
            scores.append(-1000.0 if typ in (TT.CONTROL, TT.USER_DEFINED, TT.UNUSED) else -float(i))
            types.append(typ)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(_metaspace_prefix(tok_json))
        kind = "SentencePiece (tokenizer.json)"
        merges = False
    elif (model_dir / "tokenizer.model").exists():
        vocab = gguf.vocab.SentencePieceVocab(model_dir)
        tokens, scores, types = [], [], []
        for text, score, typ in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(typ)
        for i, (_text, special) in added.items():
            if i < len(types) and special:
                types[i] = TT.CONTROL
        for i in range(len(tokens), n_vocab):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(TT.UNUSED)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens[:n_vocab])
        w.add_token_scores(scores[:n_vocab])
        w.add_token_types(types[:n_vocab])
        kind = "SentencePiece"
        merges = False
    else:
        raise UnsupportedError(
            f"No supported tokenizer in {model_dir} (need tokenizer.json with byte-level BPE, or tokenizer.model).",
            where=str(model_dir),
            fix="save the tokenizer next to the model with tokenizer.save_pretrained(...)",
        )

    sv = gguf.SpecialVocab(model_dir, load_merges=merges, n_vocab=n_vocab)
    adds = _hf_adds_bos_eos(hf_tok["hello"] if hf_tok else None, sv.special_token_ids.get("bos"), sv.special_token_ids.get("eos"))
    if adds is not None:
        sv.add_special_token["bos"], sv.add_special_token["eos"] = adds
    sv.add_to_gguf(w, quiet=True)
    return kind


