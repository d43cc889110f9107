"""Per-stage plan (edgetune/stageplan.py): the training estimate against measured peaks, targets,
the refusal before a run starts, the disk check before a GGUF is written."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgetune import pipeline, stageplan
from edgetune.cli import cli
from edgetune.config import TrainConfig
from edgetune.errors import EdgetuneError
from edgetune.train.memory import estimate_memory

DEMO_VOCAB = 49152
SHAPES = {  # random-weight Llama shapes of scripts/bench_train_memory.py
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, head_dim=64, tie_word_embeddings=True, dtype="bfloat16"),
    "1.2b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=64, tie_word_embeddings=False, dtype="bfloat16"),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, dtype="bfloat16"),
}
# peak anonymous memory (GB) of `edgetune train` 3 steps, measured with shared/tools/peakmem on a
# 2-core Intel Xeon (AMX), torch 2.13, the demo tickets: (shape, batch, seq, precision, checkpointing, GB)
MEASURED = [
    ("135m", 2, 256, "bf16", False, 1.284), ("135m", 4, 512, "bf16", False, 3.513), ("135m", 2, 256, "fp32", False, 2.200),
    ("135m", 2, 256, "bf16", True, 0.794),
    ("1.2b", 2, 256, "bf16", False, 2.088), ("1.2b", 2, 256, "fp32", False, 8.042), ("1.2b", 4, 512, "bf16", False, 7.541),
    ("1.2b", 2, 256, "bf16", True, 1.193), ("1.2b", 4, 512, "bf16", True, 2.905),
    ("3b", 2, 256, "bf16", False, 4.392), ("3b", 2, 256, "bf16", True, 1.923),
]


def _shape_dir(tmp_path, name):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": DEMO_VOCAB, **SHAPES[name]}))
    return d


@pytest.mark.parametrize("shape,batch,seq,prec,ckpt,measured", MEASURED)
def test_training_estimate_within_15_percent_of_measured(tmp_path, shape, batch, seq, prec, ckpt, measured):
    est = estimate_memory(_shape_dir(tmp_path, shape), TrainConfig(batch_size=batch, max_seq_len=seq,
                                                                   gradient_checkpointing=ckpt), precision=prec)
    assert est["anon_gb"] == pytest.approx(measured, rel=0.15)
    # bf16 weights stay mmapped (file-backed) but count toward what must be resident
    assert est["total_gb"] - est["anon_gb"] == pytest.approx(est["weights_gb"] if prec == "bf16" else 0.0, abs=0.002)


def test_targets_and_memory_sizes():
    assert stageplan.parse_memory("16GB") == 16 and stageplan.parse_memory("16 GiB") == pytest.approx(17.18, abs=0.01)
    assert stageplan.resolve_target("mac-16gb").usable_gb == pytest.approx(10.7, abs=0.1)
    assert stageplan.resolve_target("rtx-4090-24gb", "48GB").memory_gb == 48
    assert stageplan.resolve_target(None, "8GB").usable_gb == pytest.approx(7.2)
    with pytest.raises(EdgetuneError, match="Unknown target"):
        stageplan.resolve_target("mac-17gb")


def test_mac_recipe_fits_a_16gb_mac_by_the_plan():
    cfg = pipeline.load_recipe("mac-lora-7b")
    p = stageplan.plan_stages(cfg, None, stageplan.TARGETS["mac-16gb"])  # the known-models table: no download
    assert p is not None and p.params > 7e9 and p.fits, [c.as_dict() for c in p.costs]
    assert {c.stage for c in p.costs} >= {"train", "fuse", "imatrix", "export", "eval"}
    assert all(c.seconds is not None for c in p.costs if c.stage != "align")
    bf16 = stageplan.plan_stages(pipeline.load_recipe("mac-lora-7b", ["train.method=lora"]), None, stageplan.TARGETS["mac-16gb"])
    assert not bf16.fits and "qlora" in bf16.cost("train").fixes[0]


def test_plan_cli_prints_every_stage_cost_and_the_fix(tmp_path):
    r = CliRunner().invoke(cli, ["plan", "mac-lora-7b", "--target", "mac-16gb", "--set", "train.method=lora",
                                 "--set", f"output={tmp_path}"])
    assert r.exit_code == 0, r.output
    assert "does not fit" in r.output and "qlora" in r.output and "imatrix" in r.output and "estimate" in r.output


def test_run_is_refused_before_any_stage_when_it_cannot_fit(tmp_path, tiny_llama_dir, monkeypatch):
    cfg = pipeline.load_recipe("quickstart", [f"output={tmp_path}", f"model={tiny_llama_dir}"])
    tiny = stageplan.Target("this machine", 0.05, 0.05, "cpu", 100.0, 10.0, "test")
    monkeypatch.setattr(stageplan, "this_machine", lambda: tiny)
    with pytest.raises(EdgetuneError, match="cannot fit") as exc:
        pipeline.run(cfg)
    assert "--force" in exc.value.fix and "GB" in exc.value.message
    assert not (tmp_path / cfg.name / "manifest.json").exists()


def test_gguf_refused_before_writing_when_the_disk_is_full(tmp_path, tiny_llama_dir, monkeypatch):
    import shutil
    from collections import namedtuple

    from edgetune.export.gguf import convert

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    out = tmp_path / "m.gguf"
    with pytest.raises(EdgetuneError, match="Not enough disk space") as exc:
        convert(tiny_llama_dir, out, "f16", verify=False)
    assert "GB free" in exc.value.message and exc.value.fix and not out.exists()
