"""The real 135M demo model round-trips: fused -> f16 -> q8_0 / q4_k_m, and adapter GGUF == fused (slow)."""

from __future__ import annotations

import pytest

from edgetune.eval.divergence import drift_text
from edgetune.export.adapter import export_adapter
from edgetune.export.verify import verify_adapter
from edgetune.fuse import fuse
from edgetune.quant.build import export_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_adapter(demo_model_dir, tmp_path_factory):
    """A small random LoRA on the demo model (non-zero B: it changes the output)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
    pm = get_peft_model(base, cfg)
    with torch.no_grad():  # keep the adapter's effect moderate: a fine-tune, not noise
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.02)
    out = tmp_path_factory.mktemp("demo-adapter") / "adapter"
    pm.save_pretrained(str(out))
    return out


def test_demo_fused_f16_q8_q4(demo_model_dir, demo_adapter, tmp_path):
    fused = fuse(demo_model_dir, demo_adapter, tmp_path / "run" / "fused", show_progress=False)
    res = export_model(fused, tmp_path / "run" / "gguf", ["q8_0", "q4_k_m"], show_progress=False)
    assert {p.name for p in res["files"].values()} == {"run-f16.gguf", "run-q8_0.gguf", "run-q4_k_m.gguf"}
    rep = res["verify"]
    print("\n" + rep.summary() + "\n" + drift_text(rep.rows + res["drift"]))
    assert rep.passed and rep.tokenizer_ok and rep.template_ok
    rows = {r.label: r for r in res["drift"]}
    assert rows["q8_0"].top1 >= 0.9 and rows["q8_0"].mean_kl < 0.05
    assert rows["q4_k_m"].top1 >= 0.7 and rows["q4_k_m"].mean_kl < 0.3
    assert rows["q8_0"].mean_kl < rows["q4_k_m"].mean_kl


def test_demo_adapter_gguf_reproduces_fused(demo_model_dir, demo_adapter, tmp_path):
    from edgetune.export.gguf import convert

    base_gguf = convert(demo_model_dir, tmp_path / "base-f16.gguf", "f16", verify=False, show_progress=False)
    fused = fuse(demo_model_dir, demo_adapter, tmp_path / "fused", show_progress=False)
    fused_gguf = convert(fused, tmp_path / "fused-f16.gguf", "f16", verify=False, show_progress=False)
    ad = export_adapter(demo_model_dir, demo_adapter, tmp_path / "adapter.gguf")
    assert ad.stat().st_size < 5 * 2**20
    rep = verify_adapter(base_gguf, ad, fused_gguf, max_tokens=24)
    print("\n" + drift_text([rep.row]))
    for fused_text, adapter_text in rep.samples:
        print(repr(fused_text), "|", repr(adapter_text))
    assert rep.passed, rep.samples
    # the adapter changes the base's generations
    plain = verify_adapter(base_gguf, ad, base_gguf, max_tokens=24)
    assert plain.row.mean_kl > 10 * rep.row.mean_kl
