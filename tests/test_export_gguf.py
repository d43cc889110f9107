"""HF -> GGUF: llama.cpp loads every supported architecture, tokenizes like HF, computes the same logits."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgetune import arch as arch_table
from edgetune.errors import EdgetuneError, UnsupportedError
from edgetune.export import gguf as gg
from edgetune.export.verify import PROMPTS
from edgetune.llamacpp import load_llama


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tokenizer_dir, build_tiny_model):
    cache = {}

    def get(model_type):
        if model_type not in cache:
            import torch

            torch.set_num_threads(1)
            d = tmp_path_factory.mktemp(f"tiny-{model_type}")
            # initializer_range 0.3: peaked logits, so a wrong layout shows up as wrong argmaxes
            kw = {"initializer_range": 0.3, **arch_table.ARCHITECTURES[model_type].tiny_config}
            cache[model_type] = build_tiny_model(d, tokenizer_dir, model_type, **kw)
        return cache[model_type]

    return get


@pytest.mark.parametrize("model_type", sorted(arch_table.ARCHITECTURES))
def test_every_architecture_converts_and_matches_hf(tiny_models, tmp_path, model_type):
    model_dir = tiny_models(model_type)
    out = gg.convert(model_dir, tmp_path / "m.gguf", "f16", verify=True, show_progress=False)
    report = gg.convert.last_report
    print(report.summary())
    assert out.exists() and report.passed, report.tokenizer_mismatches
    assert report.tokenizer_ok and report.template_ok is True
    row = report.rows[0]
    assert row.positions > 100
    assert row.flips_outside_ties == 0
    assert row.max_abs <= report.tolerance
    # llama.cpp generates from it
    llm = load_llama(out, logits_all=False)
    try:
        out = llm("The capital of France is", max_tokens=4, temperature=0.0)
    finally:
        llm.close()
    assert (out["usage"]["completion_tokens"], out["choices"][0]["finish_reason"]) == (4, "length")


@pytest.mark.parametrize("outtype", ["f32", "bf16", "q8_0"])
def test_other_outtypes(tiny_llama_dir, tmp_path, outtype):
    out = gg.convert(tiny_llama_dir, tmp_path / f"m-{outtype}.gguf", outtype, verify=True, show_progress=False)
    report = gg.convert.last_report
    assert report.passed
    from edgetune.export.verify import gguf_outtype

    assert gguf_outtype(out) == outtype
    if outtype == "f32":
        assert report.rows[0].top1 == 1.0
    if outtype == "q8_0":  # reported, not gated: still close
        assert report.rows[0].mean_kl < 0.05


def test_tokenizer_metadata(tiny_llama_dir, tmp_path):
    from edgetune.export.gguf_info import read_metadata

    out = gg.convert(tiny_llama_dir, tmp_path / "m.gguf", "f16", verify=False, show_progress=False)
    meta = read_metadata(out, ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template",
                               "tokenizer.ggml.eos_token_id", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"])
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] in gg.PRE_TOKENIZERS.values()
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    tok_cfg = json.loads((tiny_llama_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>"
    assert meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.ggml.token_type"][1] == 3  # <|im_start|> is CONTROL: one special token to llama.cpp
    assert len(meta["tokenizer.ggml.merges"]) > 40000
    # special tokens and chat template text tokenize identically (checked in verify, spot-check here)
    llm = load_llama(out, logits_all=False)
    try:
        assert llm.tokenize(b"<|im_start|>user", add_bos=False, special=True)[0] == 1
        assert len(llm.tokenize(PROMPTS[2].encode(), add_bos=False, special=True)) > 5
    finally:
        llm.close()


def test_wrong_layout_is_caught_by_verification(tiny_models, tmp_path, monkeypatch):
    """Verification can fail: drop llama's q/k permutation and the f16 export must be refused."""
    import dataclasses

    broken = dataclasses.replace(arch_table.ARCHITECTURES["llama"], permute_qk=False)
    monkeypatch.setitem(arch_table.ARCHITECTURES, "llama", broken)
    out = tmp_path / "bad.gguf"
    with pytest.raises(EdgetuneError, match="verification failed"):
        gg.convert(tiny_models("llama"), out, "f16", verify=True, show_progress=False)
    assert not out.exists()  # nothing left under the final name
    assert not list(tmp_path.glob("*.part"))


def test_unsupported_architecture_refused_up_front(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon", "num_hidden_layers": 2}))
    with pytest.raises(UnsupportedError) as exc:
        gg.convert(tmp_path, tmp_path / "x.gguf")
    assert "llama" in exc.value.fix and "qwen3" in exc.value.fix
    assert not (tmp_path / "x.gguf").exists()


def test_quantized_base_refused(tiny_llama_dir, tmp_path):
    import shutil

    d = tmp_path / "q"
    shutil.copytree(tiny_llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="quantized"):
        gg.convert(d, tmp_path / "x.gguf")


def test_bf16_bits_roundtrip():
    from edgetune.tensors import f32_to_bf16_bits, to_float32

    x = np.array([1.0, -2.5, 3.1415927, 1e-3, 65504.0, 1.00390625], dtype=np.float32)
    back = to_float32(f32_to_bf16_bits(x), "BF16")
    import torch

    ref = torch.tensor(x).to(torch.bfloat16).float().numpy()
    assert np.array_equal(back, ref)


@pytest.fixture(scope="module")
def sentencepiece_llama(tmp_path_factory, build_tiny_model):
    """A tiny llama with a SentencePiece BPE tokenizer (byte fallback) trained here in < 1 s."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    lines = [p.replace("\n", " ") for p in PROMPTS] + ["The quick brown fox jumps over the lazy dog."] * 5
    corpus.write_text("\n".join(lines * 20), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "sp"), vocab_size=400, model_type="bpe", byte_fallback=True,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, character_coverage=1.0, minloglevel=2,
    )
    src = d / "src"
    src.mkdir()
    (d / "sp.model").rename(src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    ))
    tok = AutoTokenizer.from_pretrained(str(src))
    tok_dir = d / "tok"
    tok.save_pretrained(str(tok_dir))
    return build_tiny_model(d / "model", tok_dir, "llama", initializer_range=0.3, pad_token_id=0)


def test_sentencepiece_tokenizer(sentencepiece_llama, tmp_path):
    """SentencePiece vocab (tokens, scores, byte tokens) round-trips on plain text; logits match.

    Known llama.cpp limitation, asserted so it stays visible: with HF's Metaspace
    prepend_scheme="first", HF adds no "▁" after a special token or before leading spaces, while
    llama.cpp's SPM tokenizer does. Those prompts are excluded here (verification reports them).
    """
    from edgetune.export.verify import verify_gguf

    out = gg.convert(sentencepiece_llama, tmp_path / "sp.gguf", "f16", verify=False, show_progress=False)
    report = verify_gguf(sentencepiece_llama, out)
    bad = {m.split(" (special")[0] for m in report.tokenizer_mismatches}
    plain = [p for p in PROMPTS if not p.startswith(" ") and "<|" not in p]
    assert not any(repr(p[:30]) in bad for p in plain), report.tokenizer_mismatches
    row = report.rows[0]
    assert row.flips_outside_ties == 0 and row.max_abs <= report.tolerance
    from gguf import GGUFReader

    r = GGUFReader(str(out))
    assert bytes(r.fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    types = list(r.fields["tokenizer.ggml.token_type"].data)
    assert 6 in [int(r.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in types[:300]]  # BYTE tokens


def test_phi3_name_is_not_written_where_llama_cpp_would_look_up_missing_tokens(tmp_path, tokenizer_dir):
    # llama.cpp looks up <s>, </s>, <unk> by text for models named phi3/phi-3; SmolLM2's vocab has none
    d = tmp_path / "Phi-3-support-ft"
    shutil.copytree(tokenizer_dir, d)
    assert gg.gguf_model_name(d) == "Phi_3-support-ft"
    # a vocabulary that has them keeps its name
    t = json.loads((d / "tokenizer.json").read_text())
    t["added_tokens"] += [{"id": 90000 + i, "content": c} for i, c in enumerate(("<s>", "</s>", "<unk>"))]
    (d / "tokenizer.json").write_text(json.dumps(t))
    assert gg.gguf_model_name(d) == "Phi-3-support-ft"
    assert gg.gguf_model_name(tmp_path / "smollm2-ft") == "smollm2-ft"
