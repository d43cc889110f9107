"""GGUF LoRA adapters: base GGUF + adapter GGUF (llama.cpp lora_path) reproduce the fused model."""

from __future__ import annotations

import json

import pytest

from edgetune.errors import UnsupportedError
from edgetune.export.adapter import export_adapter
from edgetune.export.gguf import convert
from edgetune.export.verify import verify_adapter
from edgetune.fuse import fuse
from edgetune.llamacpp import load_llama


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory, tokenizer_dir, build_tiny_model):
    """Peaked logits (initializer_range 0.3), saved in float32 so that the fused reference carries
    no bf16 rounding: base + adapter and fused then differ only by f16 storage, and greedy
    decoding must agree token for token."""
    import torch
    from transformers import AutoModelForCausalLM

    d = build_tiny_model(tmp_path_factory.mktemp("sharp"), tokenizer_dir, "llama", initializer_range=0.3)
    AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def base_gguf(sharp_llama, tmp_path_factory):
    return convert(sharp_llama, tmp_path_factory.mktemp("bg") / "base-f16.gguf", "f16", verify=False, show_progress=False)


@pytest.mark.parametrize("extra", [{}, {"rank_pattern": {"down_proj": 2}}], ids=["uniform", "rank_pattern"])
def test_adapter_gguf_reproduces_fused(sharp_llama, base_gguf, tmp_path, extra, make_peft_adapter):
    adapter, _ = make_peft_adapter(sharp_llama, tmp_path / "adapter", alpha=2, **extra)
    gguf_adapter = export_adapter(sharp_llama, adapter, tmp_path / "adapter.gguf")
    fused = fuse(sharp_llama, adapter, tmp_path / "fused", show_progress=False)
    fused_gguf = convert(fused, tmp_path / "fused.gguf", "f16", verify=not extra, show_progress=False)
    rep = verify_adapter(base_gguf, gguf_adapter, fused_gguf, max_tokens=12)
    print(rep.row, rep.samples[0])
    assert rep.row.top1 >= 0.95 and rep.row.mean_kl < 1e-4
    assert rep.passed, rep.summary()  # distributions, not greedy strings: two numeric paths
    # and the adapter does change the base's output
    no = verify_adapter(base_gguf, gguf_adapter, base_gguf, max_tokens=12)
    assert no.row.top1 < 0.9 and not no.passed
    # small: a few hundred KB for a tiny model, metadata says LoRA
    from gguf import GGUFReader

    r = GGUFReader(str(gguf_adapter))
    assert bytes(r.fields["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(r.fields["adapter.type"].parts[-1]).decode() == "lora"
    names = [t.name for t in r.tensors]
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names


def test_mlx_adapter_exports(sharp_llama, base_gguf, tmp_path, make_peft_adapter, write_mlx_adapter):
    peft_dir, _ = make_peft_adapter(sharp_llama, tmp_path / "peft", alpha=2)
    mlx_dir = write_mlx_adapter(peft_dir, tmp_path / "mlx")
    g = export_adapter(sharp_llama, mlx_dir, tmp_path / "mlx.gguf")
    fused_gguf = convert(fuse(sharp_llama, peft_dir, tmp_path / "fused", show_progress=False), tmp_path / "f.gguf", "f16", verify=False, show_progress=False)
    rep = verify_adapter(base_gguf, g, fused_gguf, max_tokens=12)
    assert rep.passed and rep.row.mean_kl < 1e-3


def test_dora_refused(sharp_llama, tmp_path, make_peft_adapter):
    adapter, _ = make_peft_adapter(sharp_llama, tmp_path / "adapter", dora=True)
    with pytest.raises(UnsupportedError, match="DoRA"):
        export_adapter(sharp_llama, adapter, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_cli_export_adapter(sharp_llama, base_gguf, tmp_path, make_peft_adapter):
    from click.testing import CliRunner

    from edgetune.cli import cli

    adapter, _ = make_peft_adapter(sharp_llama, tmp_path / "adapter", alpha=2)
    out = tmp_path / "a.gguf"
    res = CliRunner().invoke(cli, ["export", "adapter", "--base", str(sharp_llama), "--adapter", str(adapter), "-o", str(out), "--base-gguf", str(base_gguf)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "base+adapter vs fused: top-1" in text and "→ pass" in text
    llm = load_llama(base_gguf, lora_path=out, logits_all=False)
    llm.close()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
