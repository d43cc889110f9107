"""The streamed fp32 reference (edgetune/streaming.py) computes what the whole model computes,
holding one decoder block at a time."""

from __future__ import annotations

import numpy as np
import pytest

from edgetune import streaming
from edgetune.arch import ARCHITECTURES

SEQS = [
    [1, 504, 3458, 314, 253, 1234, 28, 2, 9690, 17],
    [1, 9690, 17, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53],  # longer than the sliding window below
    [2, 77],
]


def _whole(model_dir, seqs):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return [m(torch.tensor([s])).logits[0].numpy() for s in seqs]


@pytest.fixture(scope="module")
def arch_models(tmp_path_factory, tokenizer_dir, build_tiny_model):
    out = {}
    for mt, arch in ARCHITECTURES.items():
        extra = dict(arch.tiny_config)
        if mt in ("gemma2", "gemma3_text"):
            extra.update(sliding_window=4, final_logit_softcapping=30.0)  # per-layer masks and the logit cap in play
        out[mt] = build_tiny_model(tmp_path_factory.mktemp(f"s-{mt}"), tokenizer_dir, mt, num_hidden_layers=3,
                                   tie_word_embeddings=mt != "llama", **extra)
    return out


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_streamed_logits_equal_whole_model(arch_models, model_type):
    d = arch_models[model_type]
    ref = _whole(d, SEQS)
    sm = streaming.StreamedModel(d)
    got = streaming.logits(d, SEQS, model=sm)
    for r, g in zip(ref, got, strict=True):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(np.abs(r).max()))
    # one decoder block materialised at a time, and every weight dropped afterwards
    assert sm.max_resident == 1
    assert all(p.device.type == "meta" for p in sm.model.parameters())


def test_kept_positions_and_groups(arch_models, monkeypatch):
    d = arch_models["llama"]
    ref = _whole(d, SEQS)
    keep = [slice(3, 9), slice(0, 1), slice(1, 2)]
    monkeypatch.setattr(streaming, "HIDDEN_BUDGET", 1)  # every sequence its own group: weights streamed 3 times
    sm = streaming.StreamedModel(d)
    got = streaming.logits(d, SEQS, keep=keep, model=sm)
    assert sm.passes == 3
    for r, g, k in zip(ref, got, keep, strict=True):
        np.testing.assert_allclose(g, r[k], rtol=1e-5, atol=1e-5 * float(np.abs(r).max()))


def test_layers_hold_no_weights_outside_their_turn(arch_models):
    """While a block runs, every other block's weights are still on the meta device."""
    d = arch_models["qwen2"]
    sm = streaming.StreamedModel(d)
    seen = []

    def watch(_unit):
        seen.append(sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in sm.layers))

    list(sm.run([streaming.Unit(__import__("torch").tensor([SEQS[0]]))], on_unit=watch))
    assert seen and max(seen) == 1


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_streamed_adapter_equals_peft(tiny_llama_dir, tmp_path, make_peft_adapter, hf_logits, peft_ids, dora):
    adapter, adapted = make_peft_adapter(tiny_llama_dir, tmp_path / "ad", dora=dora)
    got = streaming.logits(tiny_llama_dir, peft_ids, adapter=adapter)[0]
    # merged W + BA in fp32 vs PEFT's x·W + (x·A)·B: two roundings of the same sum
    np.testing.assert_allclose(got, adapted, rtol=1e-4, atol=1e-4 * float(np.abs(adapted).max()))
    assert np.abs(got - hf_logits(tiny_llama_dir)).max() > 1e-3  # the adapter was applied


def test_reader_rows_and_take(tiny_llama_dir):
    from edgetune.tensors import SafetensorsReader

    rd = SafetensorsReader(tiny_llama_dir)
    name = "model.embed_tokens.weight"
    whole = rd.load(name)
    assert np.array_equal(rd.rows(name, 5, 9), whole[5:9])
    idx = np.array([7, 0, 7, 100])
    assert np.array_equal(rd.take(name, idx), whole[idx])


def test_estimate_grows_with_the_block_not_the_model(tiny_llama_dir, tmp_path, tokenizer_dir, build_tiny_model):
    deeper = build_tiny_model(tmp_path / "deep", tokenizer_dir, "llama", num_hidden_layers=8)
    a = streaming.estimate_peak(tiny_llama_dir, tokens=100)
    b = streaming.estimate_peak(deeper, tokens=100)
    assert a["block"] == b["block"] and a["total"] == b["total"]


def test_measuring_llama_contexts_do_not_repack(monkeypatch):
    """Verification and drift load llama.cpp without its repacked weight copy, unless asked."""
    import llama_cpp.llama_cpp as C

    from edgetune.llamacpp import measure_repack, model_params

    assert C.llama_model_default_params().use_extra_bufts  # llama.cpp's default: repack
    with model_params(False):
        assert not C.llama_model_default_params().use_extra_bufts
    assert C.llama_model_default_params().use_extra_bufts  # restored
    assert not measure_repack()
    monkeypatch.setenv("EDGETUNE_LLAMA_REPACK", "1")
    assert measure_repack()


def test_gguf_runner_scoring_only_keeps_one_model(tiny_tools_model):
    from edgetune.eval.runners.gguf import GGUFRunner

    _, gguf = tiny_tools_model
    r = GGUFRunner(str(gguf), n_ctx=128)
    try:
        out = r.logits_many([([1, 504, 3458, 314], slice(1, 3))])
        assert out[0].shape == (2, r.vocab_size)
        assert r._llm is None  # scoring never loaded the generation context (nor its repacked weights)
    finally:
        r.close()


# peak anonymous memory of `edgetune export imatrix` over 1,000 tokens on random-weight Llama shapes
# with the demo vocabulary (scripts/bench_scale.py, shared/tools/peakmem, Intel Xeon, 2026-12-06)
MEASURED_IMATRIX_GB = {
    (576, 30, 1536, 9, 3): 0.44,  # 135M
    (2048, 16, 8192, 32, 8): 0.80,  # 1.17B
    (3072, 28, 8192, 24, 8): 0.97,  # 3.1B
}


@pytest.mark.parametrize("shape", list(MEASURED_IMATRIX_GB), ids=["135m", "1.2b", "3b"])
def test_estimate_matches_measured_streamed_peaks(tmp_path, shape):
    import json

    h, layers, inter, heads, kv = shape
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": h, "num_hidden_layers": layers, "intermediate_size": inter,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": 49152}))
    est = streaming.estimate_peak(tmp_path, tokens=1000)["total"] / 1e9
    assert abs(est - MEASURED_IMATRIX_GB[shape]) / MEASURED_IMATRIX_GB[shape] < 0.15
