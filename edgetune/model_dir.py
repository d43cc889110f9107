"""What a base model folder says about itself without loading weights: its identity
(:func:`model_fingerprint`, what caches and run manifests key on) and, for a base imported with
``edgetune models import``, where it came from (:func:`read_source`, ``import.json``).

A bottom-layer module: the data stage (the replay cache), the run folder, the registry and the
adapter export route all read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgetuneError

SMALL_FILE = 64 << 20  # model files up to this size are fingerprinted by content, larger ones by size


def model_fingerprint(model_dir: str | Path) -> str:
    """Identity of a base model folder without reading gigabytes: config/tokenizer files by content,
    weight files by name and size (re-hashing a 16 GB base on every run would dominate a short run)."""
    from .io import sha256_file, sha256_json

    model_dir = Path(model_dir)
    parts = []
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = f.stat().st_size
        digest = sha256_file(f) if size <= SMALL_FILE else f"size:{size}"
        parts.append((str(f.relative_to(model_dir)), digest))
    return sha256_json(parts)


@dataclass(frozen=True)
class Source:
    """Where an imported base came from (``import.json``'s ``source``)."""

    kind: str  # gguf | ollama
    path: Path  # the GGUF file (for Ollama: the model blob)
    name: str | None  # the Ollama name, e.g. qwen2.5:0.5b
    sha256: str | None
    file_type: str | None  # the quant type, e.g. Q4_K_M

    @property
    def ollama_name(self) -> str | None:
        """The Ollama name the Modelfile's FROM says (the model the user already runs); None for a file."""
        return self.name if self.kind == "ollama" and self.name else None

    @property
    def from_line(self) -> str:
        """What the Modelfile's FROM says: the Ollama name or the file."""
        return self.ollama_name or str(self.path)


def read_source(model_dir) -> Source | None:
    """The import record of ``model_dir``; None when it was not imported (an HF folder)."""
    p = Path(model_dir) / "import.json"
    if not p.is_file():
        return None
    try:
        src = json.loads(p.read_text(encoding="utf-8"))["source"]
        return Source(src["kind"], Path(src["path"]), src.get("name"), src.get("sha256"), src.get("file_type"))
    except (ValueError, KeyError, TypeError) as exc:
        raise EdgetuneError(f"{p} is not an import record edgetune can read ({exc}).", where=str(p),
                            fix="re-import the model with `edgetune models import SOURCE`") from None
