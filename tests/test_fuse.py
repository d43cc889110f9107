"""fuse: PEFT and mlx-lm LoRA/DoRA adapters merged into the base reproduce the adapted model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgetune.errors import EdgetuneError, UnsupportedError
from edgetune.fuse import fuse, load_adapter
from edgetune.tensors import SafetensorsReader


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_fuse_matches_adapted_model(tiny_llama_dir, tmp_path, dora, make_peft_adapter, hf_logits):
    adapter, adapted = make_peft_adapter(tiny_llama_dir, tmp_path / "adapter", dora=dora)
    out = fuse(tiny_llama_dir, adapter, tmp_path / "fused", show_progress=False)
    base = hf_logits(tiny_llama_dir)
    fused = hf_logits(out)
    # the adapter really changes outputs, and the fused model reproduces them (bf16 rounding only)
    assert np.abs(adapted - base).max() > 20 * np.abs(adapted - fused).max()
    assert (adapted.argmax(-1) == fused.argmax(-1)).mean() >= 0.9
    # a standard HF folder: config, tokenizer, chat template, generation config, record
    for f in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (out / f).exists(), f
    rec = json.loads((out / "edgetune_fuse.json").read_text())
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert len(targets) == 7  # every linear layer of both blocks
    assert rec["dora"] is dora and rec["merged_layers"] == 2 * len(targets)
    # same dtype as the base (bf16), never quantized
    assert {r.dtype for r in SafetensorsReader(out).refs.values()} == {"BF16"}


def test_rslora_and_rank_pattern(tiny_llama_dir, tmp_path, make_peft_adapter, hf_logits):
    adapter, adapted = make_peft_adapter(
        tiny_llama_dir, tmp_path / "a", use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3}
    )
    ad = load_adapter(adapter)
    assert ad.layers["model.layers.0.mlp.down_proj"].A.shape[0] == 2
    out = fuse(tiny_llama_dir, adapter, tmp_path / "f", show_progress=False)
    fused = hf_logits(out)
    base = hf_logits(tiny_llama_dir)
    assert np.abs(adapted - base).max() > 20 * np.abs(adapted - fused).max()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_mlx_adapter_format(tiny_llama_dir, tmp_path, dora, make_peft_adapter, write_mlx_adapter):
    peft_dir, adapted = make_peft_adapter(tiny_llama_dir, tmp_path / "peft", dora=dora)
    mlx_dir = write_mlx_adapter(peft_dir, tmp_path / "mlx", dora=dora)
    assert load_adapter(mlx_dir).format == "mlx"
    a = fuse(tiny_llama_dir, peft_dir, tmp_path / "fa", show_progress=False)
    b = fuse(tiny_llama_dir, mlx_dir, tmp_path / "fb", show_progress=False)
    ra, rb = SafetensorsReader(a), SafetensorsReader(b)
    for name in ra.names():
        assert np.array_equal(ra.load(name), rb.load(name)), name


def test_fuse_without_torch(tiny_llama_dir, tmp_path, make_peft_adapter):
    """The merge path imports no torch (a Mac with only [mlx] can fuse)."""
    adapter, _ = make_peft_adapter(tiny_llama_dir, tmp_path / "adapter")
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from edgetune.fuse import fuse\n"
        f"fuse({str(tiny_llama_dir)!r}, {str(adapter)!r}, {str(tmp_path / 'fused')!r}, show_progress=False)\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert (tmp_path / "fused" / "model.safetensors").exists()


def test_quantized_base_refused(tiny_llama_dir, tmp_path, make_peft_adapter):
    adapter, _ = make_peft_adapter(tiny_llama_dir, tmp_path / "adapter")
    q = tmp_path / "q4"
    shutil.copytree(tiny_llama_dir, q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="never merged into quantized"):
        fuse(q, adapter, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_wrong_base_refused(tiny_llama_dir, tokenizer_dir, tmp_path, make_peft_adapter, build_tiny_model):
    adapter, _ = make_peft_adapter(tiny_llama_dir, tmp_path / "adapter")
    other = build_tiny_model(tmp_path / "other", tokenizer_dir, "llama", hidden_size=32, intermediate_size=64, head_dim=8)
    with pytest.raises(EdgetuneError, match="shape"):
        fuse(other, adapter, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_not_an_adapter(tiny_llama_dir, tmp_path):
    with pytest.raises(EdgetuneError, match="adapter_config.json"):
        fuse(tiny_llama_dir, tmp_path, tmp_path / "out")


def test_cli_fuse(tiny_llama_dir, tmp_path, make_peft_adapter):
    from click.testing import CliRunner

    from edgetune.cli import cli

    adapter, _ = make_peft_adapter(tiny_llama_dir, tmp_path / "adapter")
    res = CliRunner().invoke(cli, ["fuse", "--base", str(tiny_llama_dir), "--adapter", str(adapter), "-o", str(tmp_path / "f")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "f" / "model.safetensors").exists()
    # default base: the adapter's base_model_name_or_path (a local folder here)
    res = CliRunner().invoke(cli, ["fuse", "--adapter", str(adapter), "-o", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output


def test_fused_model_keeps_the_chat_template_it_was_trained_with(tiny_llama_dir, tmp_path, make_peft_adapter):
    """A model tuned with --chat-template (e.g. a tool-capable one for a base without tools) must not be
    exported with the base's template: training keeps the template beside the adapter, fuse writes it."""
    from edgetune.chat_families import detect_family
    from edgetune.data.template import KNOWN_TEMPLATES, load_tokenizer
    from edgetune.export.model_info import info_from_hf
    from edgetune.train import keep_chat_template

    adapter, _ = make_peft_adapter(tiny_llama_dir, tmp_path / "adapter")
    base_tmpl = load_tokenizer(tiny_llama_dir).chat_template
    assert base_tmpl != KNOWN_TEMPLATES["qwen2.5"]
    plain = fuse(tiny_llama_dir, adapter, tmp_path / "plain")
    assert load_tokenizer(plain).chat_template == base_tmpl  # no template kept: the base's

    keep_chat_template(adapter, "qwen2.5")
    out = fuse(tiny_llama_dir, adapter, tmp_path / "fused")
    assert load_tokenizer(out).chat_template == KNOWN_TEMPLATES["qwen2.5"]
    info = info_from_hf(out)  # what the GGUF converter and the Modelfile read
    assert info.chat_template == KNOWN_TEMPLATES["qwen2.5"]
    assert detect_family(info.chat_template).name == "qwen2.5"
    assert json.loads((out / "edgetune_fuse.json").read_text())["chat_template"] == "from training"
    # an explicit template wins over the kept one
    other = fuse(tiny_llama_dir, adapter, tmp_path / "other", chat_template="chatml")
    assert load_tokenizer(other).chat_template == KNOWN_TEMPLATES["chatml"]


def test_fuse_carries_the_training_chat_template(tiny_llama_dir, tmp_path, make_peft_adapter):
    """An adapter trained with --chat-template (the demo's tool template) is fused with it: the
    fused tokenizer renders tools; without the option the base's own template is kept."""
    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from edgetune.cli import cli
    from edgetune.data.template import resolve_chat_template

    adapter, _ = make_peft_adapter(tiny_llama_dir, tmp_path / "adapter")
    args = ["fuse", "--base", str(tiny_llama_dir), "--adapter", str(adapter), "-o"]
    res = CliRunner().invoke(cli, [*args, str(tmp_path / "f"), "--chat-template", "demo:smollm2-tools.jinja"])
    assert res.exit_code == 0, res.output
    tok = AutoTokenizer.from_pretrained(tmp_path / "f")
    assert tok.chat_template == resolve_chat_template("demo:smollm2-tools.jinja")
    assert json.loads((tmp_path / "f" / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template
    assert CliRunner().invoke(cli, [*args, str(tmp_path / "g")]).exit_code == 0
    assert "<tool_call>" not in AutoTokenizer.from_pretrained(tmp_path / "g").chat_template
