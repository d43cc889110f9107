"""Quantization through llama.cpp, the one-shot export, and the export CLI."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from edgetune.cli import cli
from edgetune.errors import EdgetuneError
from edgetune.export.gguf import convert
from edgetune.export.verify import gguf_outtype
from edgetune.llamacpp import load_llama
from edgetune.quant.build import quant_drift
from edgetune.quant.quantize import load_imatrix, quantize


@pytest.fixture(scope="module")
def f16_gguf(tiny_llama_dir, tmp_path_factory):
    return convert(tiny_llama_dir, tmp_path_factory.mktemp("q") / "tiny-f16.gguf", "f16", verify=False, show_progress=False)


def test_quantize_types_load_and_report_drift(f16_gguf, tmp_path):
    files = {q: quantize(f16_gguf, tmp_path / f"tiny-{q}.gguf", q) for q in ("q8_0", "q4_k_m")}
    assert gguf_outtype(files["q8_0"]) == "q8_0"
    # hidden 64 is not a multiple of 256: llama.cpp falls back from q4_K for those rows
    assert gguf_outtype(files["q4_k_m"]) not in ("f16", "f32")
    assert files["q4_k_m"].stat().st_size < f16_gguf.stat().st_size
    rows = {r.label: r for r in quant_drift(f16_gguf, files)}
    print("\n".join(str(r) for r in rows.values()))
    assert rows["q8_0"].top1 >= 0.9 and rows["q8_0"].mean_kl < 1e-3
    assert rows["q8_0"].mean_kl <= rows["q4_k_m"].mean_kl
    llm = load_llama(files["q4_k_m"], logits_all=False)
    try:
        out = llm("Hello", max_tokens=3, temperature=0.0)
        assert (out["usage"]["completion_tokens"], out["choices"][0]["finish_reason"]) == (3, "length")
    finally:
        llm.close()


def test_quantize_errors(f16_gguf, tmp_path):
    with pytest.raises(EdgetuneError, match="Unknown quantization type"):
        quantize(f16_gguf, tmp_path / "x.gguf", "q3_banana")
    with pytest.raises(EdgetuneError, match="importance matrix"):
        quantize(f16_gguf, tmp_path / "x.gguf", "iq2_m")
    with pytest.raises(EdgetuneError, match="not found"):
        quantize(tmp_path / "missing.gguf", tmp_path / "x.gguf", "q8_0")
    assert not (tmp_path / "x.gguf").exists()


def test_imatrix_is_read_and_used(f16_gguf, tmp_path, legacy_imatrix):
    im, entries = legacy_imatrix(f16_gguf, tmp_path / "imatrix.dat")
    data = load_imatrix(im)
    assert set(data) == {n for n, _ in entries}
    out = quantize(f16_gguf, tmp_path / "tiny-iq4_nl.gguf", "iq4_nl", imatrix=im)
    plain = quantize(f16_gguf, tmp_path / "tiny-iq4_nl-plain.gguf", "iq4_nl")
    assert out.read_bytes() != plain.read_bytes()  # the importance weights changed the rounding
    rows = quant_drift(f16_gguf, {"iq4_nl+imatrix": out})
    assert rows[0].top1 > 0.5


def test_cli_one_shot_export(tiny_llama_dir, tmp_path):
    res = CliRunner().invoke(cli, ["export", str(tiny_llama_dir), "--quant", "q8_0,q4_k_m", "-o", str(tmp_path), "--name", "tiny"])
    assert res.exit_code == 0, res.output
    for t in ("f16", "q8_0", "q4_k_m"):
        assert (tmp_path / f"tiny-{t}.gguf").exists()
    assert "top-1" in res.output and "q4_k_m" in res.output


def test_cli_gguf_and_quantize(tiny_llama_dir, tmp_path):
    out = tmp_path / "m-f16.gguf"
    res = CliRunner().invoke(cli, ["export", "gguf", str(tiny_llama_dir), "-o", str(out), "--no-verify"])
    assert res.exit_code == 0, res.output
    assert "vs HF" not in res.output  # --no-verify skipped the check
    res = CliRunner().invoke(cli, ["export", "quantize", str(out), "--type", "q8_0", "--type", "q5_k_m"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m-q8_0.gguf").exists() and (tmp_path / "m-q5_k_m.gguf").exists()
    res = CliRunner().invoke(cli, ["export", "quantize", str(out), "--type", "q9_9"])
    assert res.exit_code != 0 and "Unknown quantization type" in str(res.exception or res.output)
