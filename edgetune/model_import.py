"""Import a quantized GGUF, a file or a model in the local Ollama store, as a trainable HF folder.

``edgetune models import SOURCE`` (a GGUF path or ``ollama:NAME[:TAG]``) starts from the exact
weights a user serves: transformers de-quantizes the GGUF (with gguf-py) and the model is saved as
a plain bf16 HF folder (safetensors, tokenizer, the GGUF's chat template, generation config). Order
of work, so that bad input fails in milliseconds and nothing is left under the final name:

1. resolve the source (:func:`resolve_source`): a GGUF path, or an Ollama name looked up in
   ``$OLLAMA_MODELS`` (default ``~/.ollama/models``): the manifest
   ``manifests/<host>/<namespace>/<name>/<tag>`` (host ``registry.ollama.ai``, namespace ``library``,
   tag ``latest`` by default) names its layers ``{mediaType, digest: "sha256:<hex>", size}``; the
   ``application/vnd.ollama.image.model`` layer is the GGUF, stored as ``blobs/sha256-<hex>``, and its
   sha256 must equal the digest. No network and no ``ollama`` binary: the store is read as files;
2. read the GGUF header (:func:`inspect_gguf`): the magic, ``general.architecture`` (one edgetune
   trains, :mod:`edgetune.arch`, and transformers' GGUF loader reads), every tensor's GGML type (one
   gguf-py's ``gguf.quants.dequantize`` handles), ``general.file_type``;
3. de-quantize and save into a temporary folder next to the output (:func:`edgetune.io.atomic_dir`);
4. verify (unless ``verify=False``), then rename the folder onto its final name.

Verification, every figure recorded in ``import.json`` and printed:

* **tensors**: every saved tensor equals the de-quantized GGUF tensor in the saved dtype (bf16), bit
  for bit (:func:`check_tensors`);
* **tokenizer**: the saved tokenizer gives the GGUF tokenizer's ids and renders its chat template
  identically (:func:`check_tokenizer`); the saved template is the GGUF's ``tokenizer.chat_template``
  character for character. Informational: on how many of those texts llama.cpp's own tokenizer (what
  llama.cpp and Ollama tokenize with) gives the same ids;
* **logits against llama.cpp** (:func:`llama_cpp_drift`): llama.cpp runs the source GGUF itself and
  greedily answers :data:`VERIFY_PROMPTS` (chat-rendered, :data:`ANSWER_TOKENS` tokens each), keeping
  its logits at every position; the saved folder (fp32 compute, streamed block by block:
  :func:`edgetune.streaming.logits`) reads the same ids (teacher-forced), and the two next-token
  distributions are compared at every position: top-1 agreement and mean KL(HF || llama.cpp). Both
  run the same de-quantized weights, so what differs is the bf16 rounding of the weights and the
  numeric paths: llama.cpp's CPU backend quantizes activations to 8 bits for its quantized matmuls and
  keeps the KV cache in f16. Measured on this project's CPU machine (Intel Xeon, llama.cpp AVX2
  build), 164-181 positions: the real SmolLM2-135M-Instruct as Q4_1 top-1 98.9% / KL 0.0055, as Q8_0
  99.4% / 0.0055, as Q4_K_M 92.0% / 0.0103 (fp32 instead of bf16 weights moves these by < 3%: the
  activation path dominates); tiny random models 98.9-100% / KL < 2e-5. One damaged matrix in the
  saved 135M model (rows shuffled in layer 0 down_proj or layer 15 q_proj, layer 29 up_proj zeroed)
  gave top-1 0.03-0.70 and KL 0.34-8.6. Hence :data:`MIN_TOP1` 0.80 and :data:`MAX_KL` 0.05: ~5x
  above the worst clean KL, ~7x below the mildest damage; top-1 keeps 12 points below the Q4_K_M
  figure and 10 above the damage. The check catches a loader that reads the file differently from
  llama.cpp (a permutation, a norm offset, a rope or epsilon setting), which the tensor check cannot
  see (a small scale error, 1.1x on one v_proj, stays inside the noise: the tensor check is the
  guard for single values). Without llama-cpp-python it is skipped with a note.

Memory: transformers de-quantizes tensor by tensor into bf16, the saved files are checked one tensor
at a time and the fp32 reference streams one block at a time (135M model: 1.0 GB peak RSS).

``import.json`` (read by whoever ships an adapter ``FROM`` the same Ollama name or blob; keep it
stable)::

    {
      "source": {
        "kind": "gguf" | "ollama",
        "path": str,            # the GGUF read (for Ollama: <store>/blobs/sha256-<hex>), absolute
        "name": str | null,     # Ollama name with its tag, as given ("qwen2.5:0.5b", "me/bot:latest");
                                # null for a file
        "sha256": str,          # hex sha256 of the GGUF (for Ollama: the manifest digest, checked)
        "file_type": str,       # general.file_type as llama.cpp names it: "Q4_K_M", "Q8_0", "F16", ...
                                # (the dominant tensor type, e.g. "Q4_K", when the key is absent)
        "tensor_types": {str: int},  # tensors per GGML type, e.g. {"F32": 65, "Q4_K": 97, "Q6_K": 25}
        "size_bytes": int       # bytes of the GGUF
      },
      "edgetune_version": str,
      "saved_dtype": "bfloat16",
      "verification": {         # {"skipped": true} with --no-verify
        "tensors": {"checked": int, "bit_equal": true},
        "tokenizer": {"texts": int, "identical": true, "chat_template": "identical" | "none",
                      "llama_cpp_ids_equal": int | null},
        "llama_cpp": {"sequences": int, "positions": int, "top1": float, "mean_kl": float,
                      "max_abs_logit": float, "min_top1": float, "max_kl": float, "hf_compute": "float32"}
                     | {"skipped": str}
      }
    }
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .console import console
from .demo_model import (
    VERIFY_PROMPTS,
    check_tensors,
    check_tokenizer,
    load_dequantized,
    plain_model,
    save_hf_folder,
    verify_texts,
)
from .errors import EdgetuneError, UnsupportedError
from .io import atomic_dir

MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
ADAPTER_MEDIA_TYPE = "application/vnd.ollama.image.adapter"
OLLAMA_HOST = "registry.ollama.ai"
OLLAMA_NAMESPACE = "library"
OLLAMA_TAG = "latest"
SAVED_DTYPE = "bfloat16"
ANSWER_TOKENS = 24
MIN_TOP1 = 0.80  # see the module docstring for the measurements behind both bounds
MAX_KL = 0.05
REIMPORT = "run 'edgetune models import' again; if it repeats, report it with the GGUF's name"
LIST_MODELS = "run 'ollama list' to see the models in the store (and 'ollama pull NAME' to add one)"


@dataclass
class ImportSource:
    kind: str  # "gguf" | "ollama"
    path: Path  # the GGUF file
    name: str | None  # Ollama name with tag, None for a file
    sha256: str | None  # None until computed (a file is hashed after its header is checked)
    size_bytes: int


@dataclass
class GGUFFacts:
    architecture: str  # general.architecture
    file_type: str  # "Q4_K_M", ...
    tensor_types: dict[str, int]  # GGML type name -> tensor count
    n_params: int
    chat_template: str | None
    general_name: str | None = None
    license: str | None = None


# ---------------------------------------------------------------------------------------------
# Sources: a GGUF file, or a model in the local Ollama store
# ---------------------------------------------------------------------------------------------


def ollama_store() -> Path:
    """Ollama's model store: ``$OLLAMA_MODELS`` or ``~/.ollama/models``."""
    import os

    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def split_tag(ref: str) -> tuple[str, str]:
    """``path[:tag]`` -> (path, tag): the tag follows the last ``:`` of the last ``/`` part (a host may
    carry a port); ``latest`` when there is none."""
    if ":" in ref.rsplit("/", 1)[-1]:
        path, _, tag = ref.rpartition(":")
        return path, tag
    return ref, OLLAMA_TAG


def parse_ollama_name(ref: str) -> tuple[str, str, str, str]:
    """``[host/][namespace/]name[:tag]`` -> (host, namespace, name, tag), Ollama's defaults filled in."""
    path, tag = split_tag(ref)
    parts = path.split("/")
    if not tag or len(parts) > 3 or any(not p or p in (".", "..") for p in parts) or "\\" in ref:
        raise EdgetuneError(
            f"'{ref}' is not an Ollama model name.",
            fix="write ollama:NAME[:TAG], e.g. ollama:qwen2.5:0.5b, ollama:user/model:tag or ollama:host/ns/model:tag",
        )
    host, namespace = OLLAMA_HOST, OLLAMA_NAMESPACE
    if len(parts) == 3:
        host, namespace, name = parts
    elif len(parts) == 2:
        namespace, name = parts
    else:
        name = parts[0]
    return host, namespace, name, tag


def resolve_ollama(ref: str, store: Path | None = None) -> ImportSource:
    """The GGUF blob of Ollama model ``ref`` in the local store; its sha256 checked against the manifest."""
    store = Path(store) if store else ollama_store()
    host, namespace, name, tag = parse_ollama_name(ref)
    shown = "{}:{}".format(*split_tag(ref))
    manifest = store / "manifests" / host / namespace / name / tag
    if not manifest.is_file():
        where = "there is no Ollama store there" if not store.is_dir() else "no such manifest"
        raise EdgetuneError(
            f"Ollama model '{shown}' is not in the local Ollama store {store} ({where}).",
            where=str(manifest),
            fix=f"{LIST_MODELS}; if Ollama keeps its models elsewhere (a Linux system service uses "
                "/usr/share/ollama/.ollama/models), set OLLAMA_MODELS to that folder",
        )
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers") or []
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise EdgetuneError(f"The Ollama manifest of '{shown}' is not valid JSON ({exc}).", where=str(manifest),
                            fix=f"pull the model again: ollama pull {shown}") from None
    models = [la for la in layers if isinstance(la, dict) and la.get("mediaType") == MODEL_MEDIA_TYPE]
    if not models:
        found = sorted({str(la.get("mediaType")) for la in layers if isinstance(la, dict)})
        raise EdgetuneError(
            f"The Ollama manifest of '{shown}' has no model layer (mediaType {MODEL_MEDIA_TYPE}); media types "
            f"found: {', '.join(found) or 'none'}.",
            where=str(manifest),
            fix=f"pull it again (ollama pull {shown}); a model stored as safetensors tensors cannot be imported: "
                "import its GGUF file instead",
        )
    if len(models) > 1:
        raise UnsupportedError(f"The Ollama manifest of '{shown}' has {len(models)} model layers.",
                               where=str(manifest), fix="import the GGUF file you mean directly")
    if any(isinstance(la, dict) and la.get("mediaType") == ADAPTER_MEDIA_TYPE for la in layers):
        raise UnsupportedError(
            f"Ollama model '{shown}' applies a LoRA adapter on top of its GGUF: importing the GGUF alone would "
            "train on other weights than the ones Ollama serves.",
            where=str(manifest), fix="import the base model it was created FROM (its Modelfile, from 'ollama show', names it)",
        )
    digest = str(models[0].get("digest", ""))
    m = re.fullmatch(r"sha256:([0-9a-f]{64})", digest)
    if not m:
        raise EdgetuneError(f"The model layer of '{shown}' has digest {digest!r}, not sha256:<64 hex digits>.",
                            where=str(manifest), fix=f"pull the model again: ollama pull {shown}")
    blob = store / "blobs" / f"sha256-{m.group(1)}"
    if not blob.is_file():
        raise EdgetuneError(f"The model blob of '{shown}' is missing from the Ollama store.", where=str(blob),
                            fix=f"pull the model again: ollama pull {shown}")
    actual = stream_sha256(blob, f"sha256 of {shown}")
    if actual != m.group(1):
        raise EdgetuneError(
            f"The model blob of '{shown}' is damaged: its sha256 is {actual}, the manifest says {m.group(1)}.",
            where=str(blob), fix=f"remove and pull the model again: ollama rm {shown} && ollama pull {shown}",
        )
    return ImportSource("ollama", blob.resolve(), shown, actual, blob.stat().st_size)


def stream_sha256(path: Path, label: str) -> str:
    """sha256 of a (possibly many-GB) file, read in 8 MiB blocks with a progress bar."""
    from .console import progress

    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh, progress(transient=True) as bar:
        task = bar.add_task(label, total=size, visible=size > 256 * 2**20)
        while block := fh.read(8 << 20):
            h.update(block)
            bar.advance(task, len(block))
    return h.hexdigest()


def resolve_source(source: str | Path) -> ImportSource:
    """``ollama:NAME[:TAG]`` from the local Ollama store (blob hash checked), or a GGUF path (not yet hashed)."""
    text = str(source)
    if text.startswith("ollama:"):
        return resolve_ollama(text[len("ollama:"):])
    p = Path(text).expanduser()
    if not p.is_file():
        hint = f"; for a model in the local Ollama store write ollama:{text}" if ":" in text and not p.exists() else ""
        what = "is a folder, not a GGUF file" if p.is_dir() else "GGUF file not found"
        raise EdgetuneError(f"{p}: {what}.", where=str(p), fix=f"pass the path of a .gguf file{hint}")
    return ImportSource("gguf", p.resolve(), None, None, p.stat().st_size)  # hashed once its header is checked


# ---------------------------------------------------------------------------------------------
# The GGUF header: architecture, tensor types, file type
# ---------------------------------------------------------------------------------------------


def supported_gguf_archs() -> dict[str, list[str]]:
    """GGUF architecture -> the edgetune ``model_type`` rows that use it (:mod:`edgetune.arch`)."""
    from .arch import ARCHITECTURES

    out: dict[str, list[str]] = {}
    for a in ARCHITECTURES.values():
        out.setdefault(a.gguf_arch, []).append(a.model_type)
    return out


def transformers_reads(arch: str) -> bool | None:
    """Whether transformers' GGUF loader knows ``arch`` (None: this transformers does not say)."""
    known: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        known |= set(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        return None
    try:  # transformers >= 5.2x: a second loader for some architectures
        from transformers.integrations.gguf.utils import is_gguf_arch_supported

        if is_gguf_arch_supported(arch):
            return True
    except ImportError:
        pass
    return arch in known


def dequantizable(type_name: str) -> bool:
    """Whether gguf-py's de-quantizer (what transformers uses) reads GGML type ``type_name``: asked of
    ``gguf.quants.dequantize`` itself, on one zero block."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qt = GGMLQuantizationType[type_name.upper()]
    _, type_size = GGML_QUANT_SIZES[qt]
    try:
        dequantize(np.zeros((1, type_size), dtype=np.uint8), qt)
    except NotImplementedError:
        return False
    return True


def file_type_name(value: int | None, tensor_types: dict[str, int]) -> str:
    """llama.cpp's name of ``general.file_type`` ("Q4_K_M"); the dominant tensor type without it."""
    from gguf import LlamaFileType

    if value is not None:
        try:
            name = LlamaFileType(int(value)).name
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            return f"unknown ({value})"
    weights = {k: v for k, v in tensor_types.items() if k != "F32"}
    return max(weights or tensor_types, key=(weights or tensor_types).get) if tensor_types else "unknown"


def inspect_gguf(path: Path) -> GGUFFacts:
    """Header facts of ``path``; a clear error for a non-GGUF, an architecture edgetune or transformers
    cannot take, or a tensor type the de-quantizer cannot read. Reads the header only (milliseconds)."""
    import struct

    from .export.gguf_info import read_header

    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise EdgetuneError(
            f"{path.name} is not a GGUF file (it starts with {magic!r}, a GGUF with b'GGUF').",
            where=str(path),
            fix="pass a .gguf model file (as llama.cpp or Ollama use), or ollama:NAME for a model in the Ollama store",
        )
    keys = ("general.architecture", "general.file_type", "general.name", "general.license", "tokenizer.chat_template")
    try:
        meta, infos = read_header(path, keys)
    except (struct.error, ValueError, IndexError) as exc:
        raise EdgetuneError(f"The GGUF header of {path.name} cannot be read ({exc}): the file is cut short or damaged.",
                            where=str(path), fix="download or copy the file again") from None
    arch = str(meta.get("general.architecture") or "?")
    archs = supported_gguf_archs()
    if arch not in archs or transformers_reads(arch) is False:
        why = "edgetune does not train it" if arch not in archs else "transformers cannot de-quantize it"
        ok = [a for a in sorted(archs) if transformers_reads(a) is not False]
        raise UnsupportedError(f"{path.name} holds a '{arch}' model, which cannot be imported ({why}).",
                               where=str(path), fix=f"import a GGUF of a supported architecture: {', '.join(ok)}")
    counts = Counter(t.type_name.upper() for t in infos)
    bad = sorted(t for t in counts if not dequantizable(t))
    if bad:
        example = next(t.name for t in infos if t.type_name.upper() == bad[0])
        raise UnsupportedError(
            f"{path.name} stores {sum(counts[t] for t in bad)} tensor(s) as {', '.join(bad)} (e.g. {example}), which "
            "gguf-py's de-quantizer cannot read.",
            where=str(path),
            fix="import a GGUF of another quantization (Q8_0, Q6_K, Q4_K_M, ... and F16/BF16/F32 all work)",
        )
    tensor_types = dict(sorted(counts.items()))
    return GGUFFacts(
        architecture=arch,
        file_type=file_type_name(meta.get("general.file_type"), tensor_types),
        tensor_types=tensor_types,
        n_params=sum(t.n_elements for t in infos),
        chat_template=meta.get("tokenizer.chat_template"),
        general_name=meta.get("general.name"),
        license=meta.get("general.license"),
    )


# ---------------------------------------------------------------------------------------------
# Saving and verification (the shared parts live in edgetune.demo_model)
# ---------------------------------------------------------------------------------------------


SENTINEL = "\u2063EDGETUNE_EOT\u2063"


def end_of_turn_id(tok) -> int | None:
    """Id of the token the chat template writes right after an assistant message (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``, ...); None when there is no template or no such token."""
    if not getattr(tok, "chat_template", None):
        return None
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": SENTINEL}]
    try:
        text = tok.apply_chat_template(msgs, tokenize=False)
    except Exception:  # a template may refuse this shape (e.g. require a system turn): no guess then
        return None
    if not isinstance(text, str) or text.count(SENTINEL) != 1:
        return None
    after = text.split(SENTINEL, 1)[1].lstrip()
    specials = set(tok.get_added_vocab()) | set(getattr(tok, "all_special_tokens", []) or [])
    hit = max((t for t in specials if t and after.startswith(t)), key=len, default=None)
    return tok.convert_tokens_to_ids(hit) if hit else None


def prompt_ids(tok) -> list[list[int]]:
    """Token ids of :data:`VERIFY_PROMPTS` as single-turn chats (plain text without a template)."""
    if getattr(tok, "chat_template", None):
        return [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]) for p in VERIFY_PROMPTS]
    return [tok(p)["input_ids"] for p in VERIFY_PROMPTS]


def llama_cpp_drift(saved_dir: Path, gguf: Path, tok, eot: int | None = None) -> tuple[dict, int]:
    """The saved HF folder (fp32 compute) against llama.cpp running ``gguf``, teacher-forced on the
    prompts plus llama.cpp's own greedy answers: (figures as in ``import.json``, on how many of the
    :func:`verify_texts` llama.cpp's tokenizer gives ``tok``'s ids)."""
    import numpy as np

    from .eval.divergence import combine, drift
    from .export.verify import hf_logits
    from .llamacpp import load_llama

    prompts = prompt_ids(tok)
    texts = verify_texts(tok)
    n_ctx = max(512, max(len(p) for p in prompts) + ANSWER_TOKENS + 8)
    llm = load_llama(gguf, n_ctx=n_ctx)
    try:
        same_ids = sum(llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)
                       == tok(t, add_special_tokens=False)["input_ids"] for t in texts)
        stops = {llm.token_eos(), eot} - {None, -1}
        seqs, test = [], []
        for ids in prompts:  # greedy: the argmax of llama.cpp's own logits, token by token
            llm.reset()
            llm.eval(ids)
            answer: list[int] = []
            while len(answer) < ANSWER_TOKENS and (t := int(np.argmax(llm.scores[llm.n_tokens - 1]))) not in stops:
                answer.append(t)
                llm.eval([t])
            seqs.append(ids + answer)
            test.append(np.array(llm.scores[: llm.n_tokens], dtype=np.float32))  # every position of the sequence
    finally:
        llm.close()
    ref = hf_logits(saved_dir, seqs)
    row = combine([drift(r, t, "hf vs llama.cpp") for r, t in zip(ref, test, strict=True)], "hf vs llama.cpp")
    return {
        "sequences": len(seqs), "positions": row.positions, "top1": round(row.top1, 6),
        "mean_kl": float(row.mean_kl), "max_abs_logit": round(row.max_abs, 6),
        "min_top1": MIN_TOP1, "max_kl": MAX_KL, "hf_compute": "float32",
    }, same_ids


# ---------------------------------------------------------------------------------------------
# edgetune models import
# ---------------------------------------------------------------------------------------------


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "model"


def default_name(source: str) -> str:
    """Folder name for ``source``: ``ollama:qwen2.5:0.5b`` -> ``qwen2.5-0.5b``, ``ollama:me/bot`` ->
    ``me-bot-latest``, ``/x/Model.Q4_K_M.gguf`` -> ``model.q4_k_m``."""
    if source.startswith("ollama:"):
        host, namespace, name, tag = parse_ollama_name(source[len("ollama:"):])
        prefix = "" if namespace == OLLAMA_NAMESPACE else f"{namespace}-"
        return slug(f"{prefix}{name}-{tag}")
    return slug(Path(source).name.removesuffix(".gguf"))


def output_dir(source: str, out: str | Path | None, name: str | None) -> Path:
    from .paths import home

    if out:
        return Path(out).expanduser()
    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise EdgetuneError(f"--name {name!r} is not a folder name.",
                            fix="use letters, digits, '.', '_' and '-' (or -o DIR for any path)")
    return home() / "base" / (name or default_name(source))


def _refuse_existing(dest: Path, force: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise EdgetuneError(f"{dest} exists and is not a folder.", where=str(dest), fix="choose another -o DIR")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise EdgetuneError(f"{dest} already exists.", where=str(dest),
                            fix="pass --force to replace it, or choose another --name / -o DIR")


def import_model(source: str | Path, out: str | Path | None = None, *, name: str | None = None,
                 force: bool = False, verify: bool = True) -> Path:
    """Import ``source`` (a GGUF path or ``ollama:NAME[:TAG]``) as a bf16 HF folder; returns its path.

    Default folder ``<models home>/base/<name>`` (``--name``, else :func:`default_name`). An existing,
    non-empty folder is refused unless ``force``. Nothing is written under the final name unless the
    import (and, unless ``verify=False``, its verification) succeeded.
    """
    from . import __version__
    from .arch import get_arch
    from .hardware import require_free_disk

    source = str(source)
    dest = output_dir(source, out, name)
    _refuse_existing(dest, force)
    src = resolve_source(source)
    facts = inspect_gguf(src.path)
    if src.sha256 is None:
        src.sha256 = stream_sha256(src.path, f"sha256 of {src.path.name}")
    require_free_disk(dest, facts.n_params * 2, "the bf16 model", "free space there or choose another -o DIR")
    import torch  # only now: bad input is refused without loading torch
    from transformers import GenerationConfig

    console.print(f"De-quantizing {src.name or src.path.name} ({facts.architecture}, {facts.file_type}, "
                  f"{facts.n_params / 1e6:,.0f}M parameters) with transformers…")
    loaded, tok = load_dequantized(src.path, torch.bfloat16)
    model = plain_model(loaded, torch.bfloat16)
    del loaded
    arch = get_arch(model.config.model_type, where=str(src.path))
    if facts.chat_template:
        tok.chat_template = facts.chat_template  # the GGUF's string itself
    else:
        console.print(f"[yellow]note:[/] {src.path.name} carries no chat template (tokenizer.chat_template).")
    eot = end_of_turn_id(tok)
    expected = model.state_dict()  # kept for the exact check after the model is saved and dropped
    record: dict = {
        "source": {"kind": src.kind, "path": str(src.path), "name": src.name, "sha256": src.sha256,
                   "file_type": facts.file_type, "tensor_types": facts.tensor_types, "size_bytes": src.size_bytes},
        "edgetune_version": __version__,
        "saved_dtype": SAVED_DTYPE,
        "verification": {"skipped": True},
    }
    with atomic_dir(dest) as tmp:
        gen = GenerationConfig(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                               eos_token_id=eot if eot is not None else tok.eos_token_id)
        save_hf_folder(tmp, model, tok, gen)
        del model
        if verify:
            record["verification"] = _verify(tmp, src, facts, tok, expected, eot)
        del expected
        (tmp / "import.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "SOURCE.md").write_text(_source_md(dest.name, src, facts, arch.model_type), encoding="utf-8")
    console.print(f"[green]Imported:[/] {dest}")
    return dest


def _verify(tmp: Path, src: ImportSource, facts: GGUFFacts, tok, expected: dict, eot: int | None) -> dict:
    from transformers import AutoTokenizer

    from .errors import MissingDependencyError

    n_tensors = check_tensors(tmp, expected, fix=REIMPORT)
    saved_tok = AutoTokenizer.from_pretrained(tmp)
    n_texts = check_tokenizer(saved_tok, tok, fix=REIMPORT)
    if facts.chat_template and saved_tok.chat_template != facts.chat_template:
        raise EdgetuneError("The saved chat template is not the GGUF's tokenizer.chat_template; nothing was saved.",
                            where=str(src.path), fix=REIMPORT)
    tok_fig = {"texts": n_texts, "identical": True, "chat_template": "identical" if facts.chat_template else "none",
               "llama_cpp_ids_equal": None}
    result = {"tensors": {"checked": n_tensors, "bit_equal": True}, "tokenizer": tok_fig}
    try:
        fig, tok_fig["llama_cpp_ids_equal"] = llama_cpp_drift(tmp, src.path, saved_tok, eot)
    except MissingDependencyError:
        result["llama_cpp"] = {"skipped": "llama-cpp-python is not installed"}
        console.print(f"[green]Verified:[/] {n_tensors} tensors bit-identical to the de-quantized GGUF "
                      f"({SAVED_DTYPE}); tokenizer and chat template identical on {n_texts} texts; llama.cpp logit "
                      "check skipped (pip install 'edgetune[llama]').")
        return result
    result["llama_cpp"] = fig
    if fig["top1"] < MIN_TOP1 or fig["mean_kl"] > MAX_KL:
        raise EdgetuneError(
            f"The saved model does not compute what llama.cpp computes from {src.path.name}: top-1 agreement "
            f"{fig['top1']:.1%} (need >= {MIN_TOP1:.0%}), mean KL {fig['mean_kl']:.4f} nats (need <= {MAX_KL}) over "
            f"{fig['positions']} positions; nothing was saved.",
            where=str(src.path),
            fix="transformers reads this GGUF differently from llama.cpp; please report it with the file's name "
                "(--no-verify keeps the folder anyway)",
        )
    if tok_fig["llama_cpp_ids_equal"] != n_texts:
        console.print(f"[yellow]note:[/] llama.cpp tokenizes {n_texts - tok_fig['llama_cpp_ids_equal']} of {n_texts} "
                      "check texts differently from the saved tokenizer: training and serving may see other ids.")
    console.print(
        f"[green]Verified:[/] {n_tensors} tensors bit-identical to the de-quantized GGUF ({SAVED_DTYPE}); tokenizer "
        f"and chat template identical on {n_texts} texts (llama.cpp gives the same ids on "
        f"{tok_fig['llama_cpp_ids_equal']}); logits vs llama.cpp on the GGUF ({fig['sequences']} prompts + greedy "
        f"answers, {fig['positions']} positions, fp32 compute): top-1 {fig['top1']:.1%} (>= {MIN_TOP1:.0%}), "
        f"mean KL {fig['mean_kl']:.2e} (<= {MAX_KL}), max |Δlogit| {fig['max_abs_logit']:.3f}.",
        highlight=False,
    )
    return result


def _source_md(title: str, src: ImportSource, facts: GGUFFacts, model_type: str) -> str:
    origin = f"Ollama model `{src.name}`, blob `{src.path}`" if src.kind == "ollama" else f"GGUF file `{src.path}`"
    types = ", ".join(f"{k} {v}" for k, v in facts.tensor_types.items())
    lines = [
        f"# {title} (imported)\n",
        f"- origin: {origin}",
        f"- model name in the GGUF: {facts.general_name or 'n/a'}",
        f"- license (general.license): {facts.license or 'not stated in the GGUF; check the model card'}",
        f"- sha256 of the GGUF: `{src.sha256}` ({src.size_bytes:,} bytes)",
        f"- quantization: {facts.file_type} (tensors: {types})",
        f"- architecture: {facts.architecture} (GGUF) -> {model_type} (HF)",
        f"- produced by `edgetune models import`: de-quantized by transformers ({facts.file_type} -> {SAVED_DTYPE})",
        "  and saved with save_pretrained; verification figures (tensors bit for bit, tokenizer, logits",
        "  against llama.cpp on the GGUF) are in import.json.",
    ]
    return "\n".join(lines) + "\n"
