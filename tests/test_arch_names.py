"""One row of edgetune.arch is all an architecture with its own tensor names needs.

A Llama-shaped model whose HF tensors are all renamed (names gguf-py's table does not know) is
registered as a temporary row (``tensor_names`` + ``tied_embeddings``) and nothing else; the GGUF
converter, the adapter exporter and the importance matrix's name map must then give exactly what
they give for the same weights under Llama's names, each through :func:`edgetune.arch.gguf_names`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from edgetune import arch as arch_table

ROOT = Path(__file__).resolve().parents[1]

# Llama's HF name ("{bid}" = block) -> (the renamed model's HF name, gguf.MODEL_TENSOR member)
RENAMES = {
    "model.embed_tokens": ("net.vocab", "TOKEN_EMBD"),
    "model.norm": ("net.final_norm", "OUTPUT_NORM"),
    "lm_head": ("net.unembed", "OUTPUT"),
    "model.layers.{bid}.input_layernorm": ("net.cells.{bid}.pre_mix", "ATTN_NORM"),
    "model.layers.{bid}.self_attn.q_proj": ("net.cells.{bid}.mix.query", "ATTN_Q"),
    "model.layers.{bid}.self_attn.k_proj": ("net.cells.{bid}.mix.key", "ATTN_K"),
    "model.layers.{bid}.self_attn.v_proj": ("net.cells.{bid}.mix.value", "ATTN_V"),
    "model.layers.{bid}.self_attn.o_proj": ("net.cells.{bid}.mix.out", "ATTN_OUT"),
    "model.layers.{bid}.post_attention_layernorm": ("net.cells.{bid}.pre_mlp", "FFN_NORM"),
    "model.layers.{bid}.mlp.gate_proj": ("net.cells.{bid}.mlp.gate", "FFN_GATE"),
    "model.layers.{bid}.mlp.up_proj": ("net.cells.{bid}.mlp.lift", "FFN_UP"),
    "model.layers.{bid}.mlp.down_proj": ("net.cells.{bid}.mlp.drop", "FFN_DOWN"),
}
N_LAYERS = 2  # conftest's tiny models
_LIN = arch_table.ARCHITECTURES["llama"].linears
ROW = arch_table.Arch(
    "wt_renamed", "llama",
    {"query": _LIN["q_proj"], "key": _LIN["k_proj"], "value": _LIN["v_proj"], "out": _LIN["o_proj"],
     "gate": _LIN["gate_proj"], "lift": _LIN["up_proj"], "drop": _LIN["down_proj"]},
    "test only: Llama with its own tensor names", permute_qk=True, source="tests/test_arch_names.py",
    tensor_names={new: kind for new, kind in RENAMES.values()}, tied_embeddings=True,
)


def _rename(name: str) -> str:
    """A Llama HF tensor / module / PEFT key -> the renamed model's."""
    prefix = "base_model.model." if name.startswith("base_model.model.") else ""
    rest = name[len(prefix):]
    for old, (new, _) in RENAMES.items():
        for bid in range(N_LAYERS) if "{bid}" in old else [0]:
            o = old.format(bid=bid)
            if rest == o or rest.startswith(o + "."):
                return prefix + new.format(bid=bid) + rest[len(o):]
    raise AssertionError(f"no rename for {name}")


@pytest.fixture
def renamed_row(monkeypatch):
    """The temporary row, in the table only (arch.ALIASES is untouched: the row has none)."""
    monkeypatch.setitem(arch_table.ARCHITECTURES, ROW.model_type, ROW)
    return ROW


def _renamed_copy(src: Path, dst: Path) -> Path:
    """``src`` (a tiny Llama) with renamed tensors, an explicit (tied) output tensor, and a
    config.json that names the new type and leaves tie_word_embeddings to the row's default."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, dst / f.name)
    tensors = load_file(src / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied: HF does not save it
    out = {_rename(k): v for k, v in tensors.items()}
    out["net.unembed.weight"] = tensors["model.embed_tokens.weight"].clone()  # the row's tied default drops it
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    assert cfg.pop("tie_word_embeddings") is True
    cfg.update(model_type=ROW.model_type, architectures=["WtRenamedForCausalLM"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _tensors(path) -> dict[str, tuple]:
    import gguf

    r = gguf.GGUFReader(str(path))
    return {t.name: (int(t.tensor_type), tuple(int(x) for x in t.shape), bytes(t.data.tobytes())) for t in r.tensors}


def _fields(path) -> dict[str, object]:
    import gguf

    r = gguf.GGUFReader(str(path))
    return {k: bytes(b"".join(p.tobytes() for p in f.parts)) for k, f in r.fields.items() if k != "general.name"}


@pytest.fixture
def lookups(monkeypatch):
    """Every HF name looked up through edgetune.arch.GGUFNames, in order."""
    seen: list[str] = []
    real = arch_table.GGUFNames.__call__

    def spy(self, hf_name):
        seen.append(hf_name)
        return real(self, hf_name)

    monkeypatch.setattr(arch_table.GGUFNames, "__call__", spy)
    return seen


def test_gguf_py_alone_does_not_know_the_renamed_tensors(renamed_row):
    import gguf

    plain = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, N_LAYERS)
    names = arch_table.gguf_names(renamed_row, {"num_hidden_layers": N_LAYERS})
    for old, (new, _) in RENAMES.items():
        for bid in range(N_LAYERS):
            hf = new.format(bid=bid) + ".weight"
            assert plain.get_name(hf, try_suffixes=(".weight", ".bias")) is None, hf  # the row is needed
            assert names(hf) == plain.get_name(old.format(bid=bid) + ".weight", try_suffixes=(".weight",))
    assert names.tied and not arch_table.gguf_names(renamed_row, {"num_hidden_layers": 1, "tie_word_embeddings": False}).tied


def test_a_row_naming_a_tensor_its_llama_cpp_arch_lacks_is_refused():
    from dataclasses import replace

    from edgetune.errors import UnsupportedError

    bad = replace(ROW, tensor_names={"net.cells.{bid}.mix.qn": "ATTN_Q_NORM"})  # llama has no attn_q_norm
    with pytest.raises(UnsupportedError, match="ATTN_Q_NORM"):
        arch_table.gguf_names(bad, {"num_hidden_layers": N_LAYERS})


def test_convert_and_adapter_export_of_a_renamed_llama_need_only_its_row(
        renamed_row, lookups, tiny_llama_dir, tmp_path, make_peft_adapter):
    from safetensors.torch import load_file, save_file

    from edgetune.export.adapter import export_adapter
    from edgetune.export.gguf import convert

    renamed = _renamed_copy(tiny_llama_dir, tmp_path / "renamed")
    assert arch_table.arch_of_model_dir(renamed) is renamed_row

    # convert: same tensors (q/k permuted, output.weight dropped by the row's tied default), same metadata
    want = convert(tiny_llama_dir, tmp_path / "llama.gguf", "f16", verify=False, show_progress=False)
    lookups.clear()
    got = convert(renamed, tmp_path / "renamed.gguf", "f16", verify=False, show_progress=False)
    assert "net.cells.0.mix.query.weight" in lookups and "net.unembed.weight" in lookups
    assert _tensors(got) == _tensors(want)
    assert "output.weight" not in _tensors(got)
    assert _fields(got) == _fields(want)

    # adapter export: a PEFT adapter of the Llama, its keys renamed the same way
    adapter, _ = make_peft_adapter(tiny_llama_dir, tmp_path / "adapter")
    radapter = tmp_path / "renamed-adapter"
    radapter.mkdir()
    ad = load_file(adapter / "adapter_model.safetensors")
    save_file({_rename(k): v for k, v in ad.items()}, radapter / "adapter_model.safetensors")
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    acfg["target_modules"] = list(renamed_row.lora_targets)
    (radapter / "adapter_config.json").write_text(json.dumps(acfg))
    want = export_adapter(tiny_llama_dir, adapter, tmp_path / "llama-lora.gguf")
    lookups.clear()
    got = export_adapter(renamed, radapter, tmp_path / "renamed-lora.gguf")
    assert "net.cells.1.mlp.drop.weight" in lookups
    assert _tensors(got) == _tensors(want)
    assert len(_tensors(got)) == 2 * 7 * N_LAYERS
    assert _fields(got) == _fields(want)


def test_imatrix_name_map_of_a_renamed_llama_needs_only_its_row(renamed_row, lookups, tiny_llama_dir, tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgetune.export.imatrix import gguf_weight_names

    renamed = _renamed_copy(tiny_llama_dir, tmp_path / "renamed")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llama_dir))
    want = gguf_weight_names(model, tiny_llama_dir)
    assert len(want) == 7 * N_LAYERS

    # the renamed model's modules: the same Linear layers under the renamed paths
    root = torch.nn.Module()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            *parents, leaf = _rename(name).split(".")
            m = root
            for p in parents:
                if not hasattr(m, p):
                    m.add_module(p, torch.nn.Module())
                m = getattr(m, p)
            m.add_module(leaf, mod)
    lookups.clear()
    got = gguf_weight_names(root, renamed)
    assert got == {_rename(k): v for k, v in want.items()}
    assert "net.cells.0.mix.key.weight" in lookups


def test_every_hf_to_gguf_name_lookup_goes_through_the_one_function():
    """gguf-py's name table, its arch enum lookup, and the tied-embedding default are read in
    edgetune/arch.py only; so is an HF folder's config.json where an error must name it."""
    pkg = ROOT / "edgetune"
    patterns = {
        "get_tensor_name_map": r"get_tensor_name_map",
        "MODEL_ARCH_NAMES": r"MODEL_ARCH_NAMES",
        ".get_name(": r"\.get_name\(",
        "tie_word_embeddings read": r"""(get\(|\[)\s*["']tie_word_embeddings["']""",
        "no config.json error": r"\(no config\.json\)|not a Hugging Face model folder",
    }
    for what, pat in patterns.items():
        where = sorted(str(p.relative_to(ROOT)) for p in pkg.rglob("*.py") if re.search(pat, p.read_text(encoding="utf-8")))
        assert where == ["edgetune/arch.py"], f"{what} outside edgetune/arch.py: {where}"
    for site in ("export/gguf.py", "export/adapter.py", "export/imatrix.py"):
        assert "gguf_names(" in (pkg / site).read_text(encoding="utf-8"), site
