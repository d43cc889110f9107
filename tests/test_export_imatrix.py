"""The importance matrix: equal to an independent computation, in llama.cpp's format, used by llama.cpp."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgetune.export.imatrix import calibration_texts, compute_imatrix, make_imatrix, write_imatrix
from edgetune.quant.quantize import load_imatrix

# HF module -> llama.cpp tensor, written out here from llama.cpp's llama-arch.cpp (LLM_TENSOR_NAMES)
# rather than taken from gguf-py's map, so that the naming is checked too.
LLAMA_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _numpy_llama_inputs(model_dir, ids: list[int]) -> dict[str, np.ndarray]:
    """The input rows of every block matrix, from a plain NumPy Llama forward (float64) over the
    safetensors weights: no torch, no transformers, no hooks."""
    from safetensors import safe_open

    cfg = json.loads((model_dir / "config.json").read_text())
    raw = {}
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:  # bf16 has no NumPy dtype: go through torch once
            raw.update({k: st.get_tensor(k).double().numpy() for k in st.keys()})
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, theta = cfg["rms_norm_eps"], cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)
    T = len(ids)
    h = raw["model.embed_tokens.weight"][ids]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(T)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def rope(x):
        rot = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], -1)
        return x * cos + rot * sin

    out = {}
    for layer in range(cfg["num_hidden_layers"]):
        w = {k.split(f"layers.{layer}.", 1)[1]: v for k, v in raw.items() if f"layers.{layer}." in k}

        def put(mod, x, layer=layer):
            out[f"blk.{layer}.{LLAMA_NAMES[mod]}.weight"] = x

        a = rms(h, w["input_layernorm.weight"])
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            put(m, a)
        q = rope((a @ w["self_attn.q_proj.weight"].T).reshape(T, nh, hd))
        k = np.repeat(rope((a @ w["self_attn.k_proj.weight"].T).reshape(T, nkv, hd)), nh // nkv, axis=1)
        v = np.repeat((a @ w["self_attn.v_proj.weight"].T).reshape(T, nkv, hd), nh // nkv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ctx = np.einsum("hts,shd->thd", p, v).reshape(T, nh * hd)
        put("self_attn.o_proj", ctx)
        h = h + ctx @ w["self_attn.o_proj.weight"].T
        m = rms(h, w["post_attention_layernorm.weight"])
        put("mlp.gate_proj", m)
        put("mlp.up_proj", m)
        g, u = m @ w["mlp.gate_proj.weight"].T, m @ w["mlp.up_proj.weight"].T
        act = g / (1 + np.exp(-g)) * u
        put("mlp.down_proj", act)
        h = h + act @ w["mlp.down_proj.weight"].T
    return out


TEXTS = ["The capital of France is Paris.", "def f(x):\n    return x * 2\n" * 3, "Héllo wörld 🤖 " * 7, "ok"]


@pytest.fixture(scope="module")
def tiny(build_tiny_model, tokenizer_dir, tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("im") / "tiny", tokenizer_dir, seed=3)


@pytest.mark.parametrize("batch_tokens", [16, 100_000])  # one text per pass, and all padded into one batch
def test_imatrix_equals_independent_numpy_forward(tiny, batch_tokens):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny))
    expected_sum2: dict[str, np.ndarray] = {}
    expected_n: dict[str, int] = {}
    for t in TEXTS:
        for name, x in _numpy_llama_inputs(tiny, tok(t).input_ids).items():
            expected_sum2[name] = expected_sum2.get(name, 0) + (x * x).sum(0)
            expected_n[name] = expected_n.get(name, 0) + x.shape[0]
    im = compute_imatrix(tiny, TEXTS, batch_tokens=batch_tokens, show_progress=False)
    assert set(im.sum2) == set(expected_sum2)  # every block matrix, named as in the GGUF
    assert im.n_tokens == sum(len(tok(t).input_ids) for t in TEXTS) == expected_n["blk.0.attn_q.weight"]
    for name, s2 in expected_sum2.items():
        assert im.counts[name] == expected_n[name]
        np.testing.assert_allclose(im.sum2[name], s2, rtol=2e-4, err_msg=name)


def test_imatrix_names_match_the_converted_gguf(tiny, tmp_path):
    from edgetune.export.gguf import convert
    from edgetune.export.gguf_info import read_tensor_infos

    gg = convert(tiny, tmp_path / "t-f16.gguf", "f16", verify=False, show_progress=False)
    infos = {t.name: t for t in read_tensor_infos(gg)}
    im = compute_imatrix(tiny, TEXTS[:2], show_progress=False)
    for name, v in im.sum2.items():
        assert name in infos, name
        assert infos[name].shape[0] == v.size  # GGUF shape is (columns, rows): one value per input column


def test_calibration_renders_training_rows_through_the_chat_template(tiny, tmp_path):
    from transformers import AutoTokenizer

    from edgetune import pipeline

    rows = [json.loads(x) for x in pipeline.demo_data_path().read_text(encoding="utf-8").splitlines()[:3]]
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(str(tiny))
    texts = calibration_texts(p, tok)
    assert texts == [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    assert "<|im_start|>assistant" in texts[0]  # prompts and answers
    (tmp_path / "bad.jsonl").write_text('{"messages": [}\n', encoding="utf-8")
    with pytest.raises(Exception, match="bad.jsonl:1"):
        calibration_texts(tmp_path / "bad.jsonl", tok)


def test_written_gguf_has_llama_cpp_layout_and_round_trips(tiny, tmp_path):
    from gguf import GGUFReader

    im = compute_imatrix(tiny, TEXTS, show_progress=False, datasets=["train.jsonl"])
    path = write_imatrix(im, tmp_path / "imatrix.gguf")
    r = GGUFReader(str(path))
    kv = {f.name: f for f in r.fields.values()}
    assert bytes(kv["general.type"].parts[-1]).decode() == "imatrix"
    assert "general.architecture" not in kv
    assert int(kv["imatrix.chunk_size"].parts[-1][0]) == 512
    assert int(kv["edgetune.imatrix.tokens"].parts[-1][0]) == im.n_tokens
    t = {x.name: x for x in r.tensors}
    assert t["blk.1.ffn_down.weight.counts"].data.reshape(-1)[0] == im.n_tokens
    assert list(t["blk.0.attn_q.weight.in_sum2"].shape) == [64, 1]  # ne0 = columns, ne1 = one matrix
    back = load_imatrix(path)
    imp = im.importance()
    assert set(back) == set(imp)
    for k in imp:
        np.testing.assert_allclose(back[k], imp[k], rtol=1e-6)


def test_llama_cpp_quantizes_with_our_imatrix(tiny256, tmp_path):
    from edgetune import pipeline
    from edgetune.export.gguf import convert
    from edgetune.llamacpp import load_llama
    from edgetune.quant.quantize import quantize

    data = tmp_path / "calib.jsonl"
    data.write_text("".join(pipeline.demo_data_path().read_text(encoding="utf-8").splitlines(keepends=True)[:20]))
    rec = make_imatrix(tiny256, data, tmp_path / "imatrix.gguf", show_progress=False)
    assert rec["texts"] == 20 and rec["tokens"] > 20 * 30
    assert json.loads((tmp_path / "imatrix.json").read_text())["data_sha256"] == rec["data_sha256"]
    f16 = convert(tiny256, tmp_path / "t-f16.gguf", "f16", verify=False, show_progress=False)
    with_im = quantize(f16, tmp_path / "t-q4_k_m-im.gguf", "q4_k_m", imatrix=tmp_path / "imatrix.gguf")
    plain = quantize(f16, tmp_path / "t-q4_k_m.gguf", "q4_k_m")
    assert with_im.stat().st_size == plain.stat().st_size
    assert with_im.read_bytes() != plain.read_bytes()  # the importance weights changed the rounding
    iq = quantize(f16, tmp_path / "t-iq3_m.gguf", "iq3_m", imatrix=tmp_path / "imatrix.gguf")  # refused without one
    for p in (with_im, iq):
        llm = load_llama(p, logits_all=False)
        try:
            out = llm("Hello", max_tokens=3, temperature=0.0)
            assert (out["usage"]["completion_tokens"], out["choices"][0]["finish_reason"]) == (3, "length")
        finally:
            llm.close()
