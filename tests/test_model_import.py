"""`edgetune models import`: a quantized GGUF (a file, or a model in a local Ollama store) becomes a
trainable bf16 HF folder, checked tensor by tensor, tokenizer and template, and against llama.cpp.

Tiny random llamas with the real SmolLM2 tokenizer, made into real GGUFs by the exporter (Q8_0) and
llama.cpp's quantizer (Q4_K_M, which needs rows that are multiples of 256: hidden 256). The Ollama
store is a real store layout in tmp_path (manifest JSON + blob named by its sha256).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgetune import model_import
from edgetune.cli import cli
from edgetune.errors import EdgetuneError
from edgetune.model_import import (
    MAX_KL,
    MIN_TOP1,
    default_name,
    import_model,
    llama_cpp_drift,
    parse_ollama_name,
    resolve_ollama,
)

MODEL_LAYER = "application/vnd.ollama.image.model"


@pytest.fixture(scope="module")
def q8_gguf(tiny_llama_dir, tmp_path_factory) -> Path:
    from edgetune.export.gguf import convert

    return convert(tiny_llama_dir, tmp_path_factory.mktemp("q8") / "tiny-q8_0.gguf", "q8_0",
                   verify=False, show_progress=False)


@pytest.fixture(scope="module")
def q4km_gguf(build_tiny_model, tokenizer_dir, tmp_path_factory) -> Path:
    from edgetune.export.gguf import convert
    from edgetune.quant.quantize import quantize

    d = tmp_path_factory.mktemp("q4km")
    hf = build_tiny_model(d / "hf", tokenizer_dir, hidden_size=256, intermediate_size=512, head_dim=64)
    f16 = convert(hf, d / "tiny256-f16.gguf", "f16", verify=False, show_progress=False)
    return quantize(f16, d / "tiny256-q4_k_m.gguf", "q4_k_m")


@pytest.fixture(scope="module")
def imported_q8(q8_gguf, tmp_path_factory) -> Path:
    return import_model(q8_gguf, tmp_path_factory.mktemp("out") / "tiny-q8")


def write_store(root: Path, blob: bytes, ref: tuple[str, ...] = ("registry.ollama.ai", "library", "tiny", "latest"),
                *, layers: list[dict] | None = None, digest: str | None = None) -> Path:
    """An Ollama store under ``root``: the blob as blobs/sha256-<hex>, a manifest naming it (or ``layers``)."""
    hexd = hashlib.sha256(blob).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / f"sha256-{hexd}").write_bytes(blob)
    if layers is None:
        layers = [{"mediaType": MODEL_LAYER, "digest": digest or f"sha256:{hexd}", "size": len(blob)},
                  {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 10}]
    manifest = root.joinpath("manifests", *ref)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    config = {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "1" * 64, "size": 2}
    manifest.write_text(json.dumps({"schemaVersion": 2, "config": config, "layers": layers,
                                    "mediaType": "application/vnd.docker.distribution.manifest.v2+json"}))
    return manifest


def assert_nothing_written(dest: Path) -> None:
    assert not dest.exists()
    if dest.parent.exists():  # no temp folder (.<name>.*.part) left next to it either
        assert not [p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.")]


def test_import_q8_0_gguf(imported_q8, q8_gguf, tiny_llama_dir, tokenizer_dir):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgetune import __version__
    from edgetune.export.gguf_info import read_tensor_infos

    rec = json.loads((imported_q8 / "import.json").read_text())
    assert set(rec) == {"source", "edgetune_version", "saved_dtype", "verification"}
    src = rec["source"]
    assert set(src) == {"kind", "path", "name", "sha256", "file_type", "tensor_types", "size_bytes"}
    assert src["kind"] == "gguf" and src["name"] is None and src["path"] == str(q8_gguf.resolve())
    assert src["sha256"] == hashlib.sha256(q8_gguf.read_bytes()).hexdigest()
    assert src["size_bytes"] == q8_gguf.stat().st_size
    assert src["file_type"] == "Q8_0"
    assert src["tensor_types"] == dict(Counter(t.type_name.upper() for t in read_tensor_infos(q8_gguf)))
    assert src["tensor_types"]["Q8_0"] >= 14  # the 7 linears of 2 layers at least
    assert rec["edgetune_version"] == __version__ and rec["saved_dtype"] == "bfloat16"

    ver = rec["verification"]
    with safe_open(str(imported_q8 / "model.safetensors"), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert ver["tensors"] == {"checked": len(saved), "bit_equal": True} and len(saved) == 20
    assert ver["tokenizer"] == {"texts": 4, "identical": True, "chat_template": "identical", "llama_cpp_ids_equal": 4}
    lc = ver["llama_cpp"]
    assert lc["sequences"] == 3 and lc["positions"] > 60 and lc["hf_compute"] == "float32"
    assert lc["min_top1"] == MIN_TOP1 and lc["max_kl"] == MAX_KL
    assert lc["top1"] >= 0.95 and lc["mean_kl"] < 1e-4, lc  # measured: 100%, 6e-7

    cfg = json.loads((imported_q8 / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(imported_q8, dtype=torch.float32)
    orig = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    for (name, a), (_, b) in zip(model.state_dict().items(), orig.state_dict().items(), strict=True):
        # the original weights within Q8_0's rounding (one step of a 127-level block scale)
        assert torch.allclose(a, b, atol=float(b.abs().max()) / 100), name
    tok = AutoTokenizer.from_pretrained(imported_q8)
    assert tok.chat_template == (tokenizer_dir / "chat_template.jinja").read_text()
    gen = json.loads((imported_q8 / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    source_md = (imported_q8 / "SOURCE.md").read_text()
    assert src["sha256"] in source_md and "Q8_0" in source_md
    assert all(f.stat().st_mode & 0o044 for f in imported_q8.iterdir())  # readable by others, as io writes files
    assert sorted(p.name for p in imported_q8.parent.iterdir()) == [imported_q8.name]


def test_import_q4_k_m_from_an_ollama_store_with_the_cli(q4km_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr(model_import, "ANSWER_TOKENS", 8)  # llama.cpp decodes token by token: keep the test quick
    store = tmp_path / "ollama-models"
    blob = q4km_gguf.read_bytes()
    write_store(store, blob, ("registry.ollama.ai", "library", "tiny", "q4km"))
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    res = CliRunner().invoke(cli, ["models", "import", "ollama:tiny:q4km"])
    assert res.exit_code == 0, res.output
    dest = tmp_path / "edgetune-home" / "base" / "tiny-q4km"  # <models home>/base/<name>
    assert res.output.strip().splitlines()[-1] == str(dest)
    rec = json.loads((dest / "import.json").read_text())
    src = rec["source"]
    digest = hashlib.sha256(blob).hexdigest()
    assert src["kind"] == "ollama" and src["name"] == "tiny:q4km"
    assert src["path"] == str((store / "blobs" / f"sha256-{digest}").resolve()) and src["sha256"] == digest
    assert src["file_type"] == "Q4_K_M" and {"Q4_K", "Q6_K"} <= set(src["tensor_types"])
    lc = rec["verification"]["llama_cpp"]
    assert lc["top1"] >= MIN_TOP1 and lc["mean_kl"] <= MAX_KL, lc  # measured (24 tokens): 98.9%, 1.1e-5
    assert "Verified:" in res.output and "top-1" in res.output
    # an existing folder is refused unless --force, and nothing in it changes
    before = (dest / "import.json").read_bytes()
    res = CliRunner().invoke(cli, ["models", "import", "ollama:tiny:q4km"])
    assert isinstance(res.exception, EdgetuneError) and "already exists" in str(res.exception)
    assert "--force" in res.exception.fix
    assert (dest / "import.json").read_bytes() == before


def test_ollama_names_map_to_manifest_paths(tmp_path, monkeypatch):
    assert parse_ollama_name("qwen2.5:7b") == ("registry.ollama.ai", "library", "qwen2.5", "7b")
    assert parse_ollama_name("qwen2.5") == ("registry.ollama.ai", "library", "qwen2.5", "latest")
    assert parse_ollama_name("me/bot:v1") == ("registry.ollama.ai", "me", "bot", "v1")
    assert parse_ollama_name("example.com:5000/me/bot") == ("example.com:5000", "me", "bot", "latest")
    for bad in ("a/b/c/d", "", "x:", "../x", "a//b"):
        with pytest.raises(EdgetuneError, match="not an Ollama model name"):
            parse_ollama_name(bad)
    assert default_name("ollama:qwen2.5:0.5b") == "qwen2.5-0.5b"
    assert default_name("ollama:me/bot") == "me-bot-latest"
    assert default_name("/x/SmolLM2-135M.Q4_K_M.gguf") == "smollm2-135m.q4_k_m"
    store = tmp_path / "store"
    write_store(store, b"weights A", ("example.com:5000", "me", "bot", "v1"))
    write_store(store, b"weights B", ("registry.ollama.ai", "me", "bot", "latest"))
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    a = resolve_ollama("example.com:5000/me/bot:v1")
    assert a.path.read_bytes() == b"weights A" and a.name == "example.com:5000/me/bot:v1" and a.kind == "ollama"
    b = resolve_ollama("me/bot")
    assert b.path.read_bytes() == b"weights B" and b.name == "me/bot:latest"
    assert b.sha256 == hashlib.sha256(b"weights B").hexdigest() and b.size_bytes == 9


def _gguf(path: Path, arch: str = "llama", qtype=None) -> Path:
    """A small real GGUF of ``arch`` with one f32 tensor, and one tensor of ``qtype`` when given."""
    from gguf import GGML_QUANT_SIZES, GGUFWriter

    w = GGUFWriter(str(path), arch)
    w.add_tensor("token_embd.weight", np.zeros((4, 64), dtype=np.float32))
    if qtype is not None:
        raw = np.zeros((4, GGML_QUANT_SIZES[qtype][1] * 2), dtype=np.uint8)  # 4 rows of 2 blocks
        w.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _refused(source, dest: Path, match: str, where: Path | str) -> EdgetuneError:
    with pytest.raises(EdgetuneError, match=match) as ei:
        import_model(source, dest)
    assert str(where) in ei.value.where and ei.value.fix
    assert_nothing_written(dest)
    return ei.value


def test_bad_gguf_files_are_refused_before_anything_is_written(tmp_path):
    from gguf import GGMLQuantizationType

    dest = tmp_path / "out" / "model"
    bert = _gguf(tmp_path / "bert.gguf", "bert")
    err = _refused(bert, dest, "'bert' model, which cannot be imported", bert)
    assert "llama" in err.fix and "qwen2" in err.fix
    q81 = _gguf(tmp_path / "q81.gguf", qtype=GGMLQuantizationType.Q8_1)
    err = _refused(q81, dest, "as Q8_1 .*blk.0.attn_q.weight", q81)
    assert "Q4_K_M" in err.fix
    zip_file = tmp_path / "model.gguf"
    zip_file.write_bytes(b"PK\x03\x04 not a gguf at all")
    _refused(zip_file, dest, "not a GGUF file", zip_file)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(_gguf(tmp_path / "whole.gguf").read_bytes()[:40])
    _refused(cut, dest, "cannot be read.*cut short", cut)
    err = _refused(tmp_path / "qwen2.5:7b", dest, "GGUF file not found", tmp_path / "qwen2.5:7b")
    assert "ollama:" in err.fix
    _refused(tmp_path, dest, "is a folder, not a GGUF file", tmp_path)
    # an existing folder: refused without force; with force the source is checked first, the folder kept
    dest.mkdir(parents=True)
    (dest / "keep.txt").write_text("x")
    with pytest.raises(EdgetuneError, match="already exists"):
        import_model(zip_file, dest)
    with pytest.raises(EdgetuneError, match="not a GGUF file"):
        import_model(zip_file, dest, force=True)
    assert (dest / "keep.txt").read_text() == "x"


def test_bad_ollama_sources_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    store = tmp_path / "store"
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    dest = tmp_path / "out" / "model"
    err = _refused("ollama:nope:1b", dest, "'nope:1b' is not in the local Ollama store .*no Ollama store there",
                   store / "manifests" / "registry.ollama.ai" / "library" / "nope" / "1b")
    assert "ollama list" in err.fix and "OLLAMA_MODELS" in err.fix
    write_store(store, b"GGUF-ish", ("registry.ollama.ai", "library", "other", "latest"))
    err = _refused("ollama:nope:1b", dest, "not in the local Ollama store .*no such manifest", "nope")
    assert "ollama list" in err.fix

    m = write_store(store, b"x", ("registry.ollama.ai", "library", "nomodel", "latest"),
                    layers=[{"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "2" * 64}])
    err = _refused("ollama:nomodel", dest, "has no model layer .*image.template", m)
    assert "ollama pull nomodel:latest" in err.fix

    promised = hashlib.sha256(b"the bytes pulled").hexdigest()
    write_store(store, b"the bytes pulled", ("registry.ollama.ai", "library", "damaged", "7b"))
    (store / "blobs" / f"sha256-{promised}").write_bytes(b"the bytes pulled, then changed")
    err = _refused("ollama:damaged:7b", dest, f"damaged: its sha256 is .*the manifest says {promised}",
                   f"sha256-{promised}")
    assert "ollama pull damaged:7b" in err.fix
    m = write_store(store, b"y", ("registry.ollama.ai", "library", "gone", "latest"), digest="sha256:" + "3" * 64)
    _refused("ollama:gone", dest, "blob of 'gone:latest' is missing", "sha256-" + "3" * 64)
    blob = b"z"
    m = write_store(store, blob, ("registry.ollama.ai", "library", "tuned", "latest"), layers=[
        {"mediaType": MODEL_LAYER, "digest": "sha256:" + hashlib.sha256(blob).hexdigest()},
        {"mediaType": "application/vnd.ollama.image.adapter", "digest": "sha256:" + "4" * 64}])
    _refused("ollama:tuned", dest, "applies a LoRA adapter", m)
    # a blob that is no GGUF: the sha256 matches, the magic does not
    write_store(store, b"\x00\x01 not gguf", ("registry.ollama.ai", "library", "junk", "latest"))
    _refused("ollama:junk", dest, "is not a GGUF file", "blobs")


def test_llama_cpp_check_sees_a_model_that_computes_otherwise(imported_q8, q8_gguf, tmp_path, monkeypatch):
    """The saved folder with its final norm's sign flipped (a converter's kind of slip, like a norm
    offset) no longer computes what llama.cpp computes from the GGUF: the figures leave the bounds
    import_model enforces. (Shuffling whole matrices hardly moves a tiny random model's top-1: its
    residual stream is mostly the token embedding.)"""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    monkeypatch.setattr(model_import, "ANSWER_TOKENS", 8)
    bad = tmp_path / "bad"
    shutil.copytree(imported_q8, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.norm.weight"] = -sd["model.norm.weight"]
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    fig, same_ids = llama_cpp_drift(bad, q8_gguf, AutoTokenizer.from_pretrained(bad))
    assert fig["top1"] < MIN_TOP1, fig  # measured: 0.0 (every argmax becomes an argmin), KL 0.051
    assert same_ids == 4  # the tokenizer is untouched
