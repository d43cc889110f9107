"""The one-row-per-concept tables (architectures, GGUF types, stages, tool syntaxes, train flags) against what reads them."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path

import pytest

from edgetune import arch as arch_table
from edgetune.arch import ARCHITECTURES
from edgetune.config import CHOICES

ROOT = Path(__file__).resolve().parents[1]


def test_readme_architecture_table_is_generated_from_the_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Supported model architectures", 1)[1].strip().splitlines()
    rows = itertools.dropwhile(lambda line: not line.startswith("|"), section)
    shown = "\n".join(itertools.takewhile(lambda line: line.startswith("|"), rows))
    assert shown == arch_table.readme_table(), "regenerate README's table with edgetune.arch.readme_table()"


def test_every_row_names_a_llama_cpp_arch_and_an_existing_hparams_hook():
    import gguf

    from edgetune.export.gguf import HPARAMS_HOOKS

    for a in ARCHITECTURES.values():
        assert a.gguf_arch in gguf.MODEL_ARCH_NAMES.values(), a.model_type
        assert a.hparams in HPARAMS_HOOKS, a.model_type
        for alias in a.aliases:
            assert arch_table.get_arch(alias) is a


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_lora_targets_and_memory_shapes_match_the_hf_model(tmp_path, model_type):
    """Each row's linears exist in the HF model under those names, with those (in, out) sizes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgetune.train.memory import _linear_shapes, _model_shapes

    a = ARCHITECTURES[model_type]
    # no two sizes equal, so a swapped or wrong dimension shows
    cfg = AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, vocab_size=128, bos_token_id=0, eos_token_id=1, **a.tiny_config,
    )
    cfg.save_pretrained(tmp_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    real = {
        name.rsplit(".", 1)[-1]: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and re.search(r"\.layers\.0\.", name)
    }
    assert _linear_shapes(_model_shapes(tmp_path), a) == real
    assert set(a.lora_targets) == set(real)


def test_gguf_types_table_matches_llama_cpp_and_gguf_py():
    import gguf

    from edgetune.qtypes import OUTTYPES, QTYPES, QUANTS

    for q in QTYPES.values():
        assert hasattr(gguf.LlamaFileType, q.ftype), q.name
        assert 1.5 < q.bits <= 32
    assert OUTTYPES == ("f32", "f16", "bf16", "q8_0")  # what export/gguf.py's encoder can write
    assert "f32" not in QUANTS and {"q4_k_m", "q8_0", "f16", "iq2_m"} <= set(QUANTS)
    try:
        import llama_cpp
    except ImportError:
        return
    for name in QUANTS:
        assert hasattr(llama_cpp, "LLAMA_FTYPE_" + QTYPES[name].ftype), name


def test_quant_type_names_are_normalized_and_unknown_ones_refused():
    from edgetune.errors import EdgetuneError
    from edgetune.qtypes import normalize_qtype

    assert normalize_qtype(" Q4_K-M ") == "q4_k_m"
    with pytest.raises(EdgetuneError) as ei:
        normalize_qtype("f32")  # written by the converter, not a llama.cpp quantize target
    assert "q4_k_m" in ei.value.fix


def test_low_bit_iquants_need_an_imatrix(tmp_path):
    pytest.importorskip("llama_cpp")
    from edgetune.errors import EdgetuneError
    from edgetune.quant.quantize import quantize

    src = tmp_path / "m-f16.gguf"
    src.write_bytes(b"GGUF")
    with pytest.raises(EdgetuneError, match="needs an importance matrix"):
        quantize(src, tmp_path / "m-iq2_m.gguf", "iq2_m")
    assert not (tmp_path / "m-iq2_m.gguf").exists()


def test_plan_disk_estimate_counts_each_gguf_at_its_bits_per_weight(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    from edgetune import pipeline
    from edgetune.config import ExportConfig, RunConfig

    model = tmp_path / "base"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
    }))
    save_file({"w": np.zeros((1000, 100), dtype=np.float16)}, str(model / "model.safetensors"))

    def disk(*quants):
        cfg = RunConfig(model=str(model), output=str(tmp_path / "runs"), export=ExportConfig(quants=list(quants)))
        p = pipeline.plan(cfg)
        assert p.params == 100_000
        return p.disk_bytes

    assert disk("q4_k_m", "q8_0") - disk("q4_k_m") == int(100_000 * 8.5 / 8)
    assert disk("q4_k_m", "iq2_m") - disk("q4_k_m") == int(100_000 * 2.7 / 8)


def test_cli_choices_come_from_the_config_tables():
    """Every click.Choice of the CLI is a CHOICES entry of the config (or the pipeline's stages)."""
    import importlib

    import click

    from edgetune.cli import COMMANDS
    from edgetune.pipeline import STAGES

    allowed = {tuple(v) for v in CHOICES.values()} | {tuple(STAGES)}

    def walk(cmd):
        yield cmd
        for sub in getattr(cmd, "commands", {}).values():
            yield from walk(sub)

    seen = 0
    for module, attr, _ in COMMANDS.values():
        for cmd in walk(getattr(importlib.import_module(module), attr)):
            for p in cmd.params:
                if isinstance(p.type, click.Choice):
                    seen += 1
                    assert tuple(p.type.choices) in allowed, (cmd.name, p.name, p.type.choices)
    assert seen >= 12


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_config_refuses_a_value_outside_its_choices(key):
    from edgetune.config import SECTIONS
    from edgetune.errors import EdgetuneError

    section, name = key.split(".")
    cls = SECTIONS[section]
    # settings a choice needs beside it (select_by picks among several evaluations)
    needs = {"train.select_by": {"eval_every": 10, "early_stopping_patience": 2}}.get(key, {})
    assert getattr(cls(**{name: CHOICES[key][-1]}, **needs), name) == CHOICES[key][-1]  # every listed value is accepted
    with pytest.raises(EdgetuneError, match=f"{key} = 'nope' is not one of"):
        cls(**{name: "nope"}, **needs)


# --- stages ---------------------------------------------------------------------------------------


def test_every_stage_has_its_functions_and_its_cost_row():
    from edgetune import pipeline, stageplan
    from edgetune.stages import STAGES

    assert tuple(s.name for s in pipeline.PIPELINE) == STAGES and "align" in STAGES
    assert set(stageplan.STAGE_COSTS) == {*STAGES, "imatrix"}
    assert stageplan.COST_ROWS.index("imatrix") == stageplan.COST_ROWS.index("export") - 1


def test_each_stage_input_hash_reads_exactly_the_stages_of_its_reads_column(tmp_path):
    """The ``reads`` column is what a stage's input hash covers: each input function asks for the output
    hashes of those stages and no others (a stage reading an upstream stage it does not declare is caught)."""
    from edgetune import pipeline
    from edgetune.config import AlignConfig, DataConfig, RunConfig
    from edgetune.runfolder import RunFolder
    from edgetune.stages import STAGE

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n', encoding="utf-8")
    cfg = RunConfig(model=str(tmp_path), output=str(tmp_path / "runs"), data=DataConfig(path=str(data)),
                    align=AlignConfig(data=str(data)))
    asked: list[str] = []

    class Recording(pipeline.Ctx):
        def output_hash(self, stage):
            asked.append(stage)
            return "h"

    c = Recording(cfg, RunFolder(tmp_path / "run", cfg), tmp_path, data, {"stages": {}, "model_fingerprint": "m"})
    for st in pipeline.PIPELINE:
        asked.clear()
        st.inputs(c)
        assert sorted(set(asked)) == sorted(STAGE[st.name].reads), st.name


def test_stage_folders_and_the_align_switch_come_from_the_table(tmp_path):
    from edgetune.config import AlignConfig, RunConfig
    from edgetune.runfolder import RunFolder
    from edgetune.stages import STAGE_TABLE, flow

    run = RunFolder(tmp_path, RunConfig())
    assert [run.stage_dir(s.name).name for s in STAGE_TABLE if s.folder] == \
        [p.name for p in (run.data_dir, run.train_dir, run.align_dir, run.fused_dir, run.gguf_dir, run.ollama_dir, run.eval_dir)]
    assert not run.aligned and RunFolder(tmp_path, RunConfig(align=AlignConfig(data="x"))).aligned
    assert flow() == "data → train → align → fuse → export → ollama → eval → register"


def test_run_help_and_readme_list_every_stage():
    from click.testing import CliRunner

    from edgetune.cli import cli
    from edgetune.stages import flow

    out = CliRunner().invoke(cli, ["run", "--help"], terminal_width=200).output
    assert flow() in " ".join(out.split())
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    line = next(ln for ln in readme.splitlines() if ln.startswith("edgetune run my-recipe.yaml --set"))
    assert line.endswith("# " + flow())


# --- tool-call syntaxes ------------------------------------------------------------------------------


def _family_templates():
    """(family, a real Jinja template of it): the training templates and tests/templates' reference ones."""
    from edgetune.chat_families import FAMILIES, FAMILY_BY_NAME

    out = [(f, f.jinja) for f in FAMILIES if f.jinja]
    meta = json.loads((ROOT / "tests" / "templates" / "families.json").read_text())
    out += [(FAMILY_BY_NAME[v["family"]], (ROOT / "tests" / "templates" / f"{k}.jinja").read_text(encoding="utf-8"))
            for k, v in meta.items() if not k.startswith("_")]
    return out


@pytest.mark.parametrize("fam,template", _family_templates(), ids=lambda v: getattr(v, "name", ""))
def test_family_tool_syntax_pointer_agrees_with_the_detected_syntax(fam, template):
    from edgetune.tool_syntax import syntax_for

    detected = syntax_for(template)
    assert (detected.name if detected else "") == fam.tools
    assert fam.syntax is detected


def test_every_tool_syntax_has_a_family_and_a_family_cannot_point_nowhere():
    from edgetune.chat_families import FAMILIES, Family
    from edgetune.tool_syntax import SYNTAXES

    assert {s.name for s in SYNTAXES} == {f.tools for f in FAMILIES if f.tools}
    with pytest.raises(ValueError, match="names no row"):
        Family("x", lambda j: False, "", (), tools="hermes2")


# --- train flags from TrainConfig ----------------------------------------------------------------------


def test_train_flags_are_generated_from_the_config_fields():
    import click

    from edgetune.cli.train import train
    from edgetune.config import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    opts = {p.name: p for p in train.params if isinstance(p, click.Option)}
    flagged = {n for n, f in fields.items() if "help" in f.metadata}
    assert flagged <= set(opts) and {"rank", "learning_rate", "beta", "rewards", "select_by"} <= flagged
    assert opts["learning_rate"].opts == ["--lr"] and set(opts["rank"].opts) == {"--rank", "-r"}
    assert opts["rank"].help == "LoRA rank (default 16)."  # the field's help and default, once
    assert opts["packing"].secondary_opts == ["--no-packing"] and opts["rewards"].opts == ["--reward"]
    assert isinstance(opts["select_by"].type, click.Choice) and opts["iters"].type is click.INT
    assert all(opts[n].default is None for n in flagged)  # unset flags leave the recipe's values


def test_train_flags_parse_into_the_config():
    from edgetune.cli.train import train

    ctx = train.make_context("train", ["-d", "x", "-o", "y", "--lr", "1e-3", "-r", "8", "--no-packing",
                                       "--target-modules", "q_proj, v_proj", "--reward", "a", "--reward", "b",
                                       "--early-stopping", "2", "--threads", "3"])
    p = ctx.params
    assert (p["learning_rate"], p["rank"], p["packing"], p["early_stopping_patience"], p["num_threads"]) == (1e-3, 8, False, 2, 3)
    assert p["target_modules"] == ["q_proj", "v_proj"] and p["rewards"] == ["a", "b"]
    assert p["iters"] is None and p["beta"] is None
