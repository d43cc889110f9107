"""Foundation: the CLI skeleton, config, atomic IO, backend choice, the demo model."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetune.cli import cli
from edgetune.config import DataConfig, TrainConfig, config_from_dict, load_config
from edgetune.errors import EdgetuneError, UnsupportedError
from edgetune.io import atomic_dir, atomic_path


def test_help_lists_every_stage():
    res = CliRunner().invoke(cli, ["--help"])
    assert res.exit_code == 0, res.output
    for name in ("doctor", "data", "train", "fuse", "export", "ollama", "serve", "eval", "run", "models"):
        assert name in res.output


def test_core_imports_without_torch_or_mlx():
    """`edgetune --help` must not import torch, mlx or transformers (lazy commands)."""
    code = (
        "import sys; from edgetune.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'mlx', 'transformers', 'llama_cpp') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY=\n" in out or out.rstrip().endswith("HEAVY="), out


def test_doctor_json_names_backend():
    res = CliRunner().invoke(cli, ["doctor", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["auto_backend"]["backend"] in ("torch", "mlx")
    assert info["auto_backend"]["reason"]
    assert info["llama_cpp"]["installed"] is True
    assert info["llama_cpp"]["batched_prompt_ok"] is True, info["llama_cpp"]
    assert info["disk"]["free_gb"] > 0 and info["memory"]["total_gb"] > 0


def test_doctor_human_output():
    res = CliRunner().invoke(cli, ["doctor"])
    assert res.exit_code == 0, res.output
    assert "auto" in res.output and "backend" in res.output


def test_config_rejects_bad_values_with_fix():
    with pytest.raises(EdgetuneError) as ei:
        TrainConfig(method="qlora4")
    assert "train.method" in str(ei.value) and "lora" in ei.value.fix
    with pytest.raises(EdgetuneError, match="Unknown setting"):
        config_from_dict({"train": {"rnak": 8}})
    with pytest.raises(EdgetuneError):
        DataConfig(dedup="fuzzy")


def test_config_yaml_overrides(tmp_path: Path):
    p = tmp_path / "r.yaml"
    p.write_text("name: demo\nmodel: m\ntrain:\n  rank: 8\n  iters: 10\nexport:\n  quants: [q8_0]\n")
    cfg = load_config(p, ["train.rank=4", "export.quants=q4_k_m,q8_0", "data.redact_pii=true"])
    assert cfg.train.rank == 4 and cfg.train.iters == 10
    assert cfg.export.quants == ["q4_k_m", "q8_0"]
    assert cfg.data.redact_pii is True
    assert cfg.train.alpha == 32.0  # default from the one place defaults live


def test_config_yaml_syntax_error_names_line(tmp_path: Path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ntrain:\n  rank: [1,\n")
    with pytest.raises(EdgetuneError) as ei:
        load_config(p)
    assert str(p) in ei.value.where


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path):
    final = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"whole")
    assert final.read_bytes() == b"whole"


def test_atomic_dir_replaces_only_on_success(tmp_path: Path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as tmp:
        (tmp / "a").write_text("2")
        raise KeyboardInterrupt
    assert (final / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_backend_choice_refuses_qlora_without_cuda():
    from edgetune.hardware import Hardware
    from edgetune.train.select import choose_backend

    cpu = Hardware(os="Linux", machine="x86_64", cpu_count=2, apple_silicon=False, torch="2.13.0")
    assert choose_backend("auto", "lora", cpu).backend == "torch"
    with pytest.raises(UnsupportedError) as ei:
        choose_backend("torch", "qlora", cpu)
    assert "CUDA" in ei.value.message and "--backend torch" in ei.value.fix
    mac = Hardware(os="Darwin", machine="arm64", cpu_count=8, apple_silicon=True, torch="2.13.0", mlx="0.2", mlx_lm="0.2")
    assert choose_backend("auto", "lora", mac).backend == "mlx"


def test_unsupported_architecture_lists_supported(tmp_path: Path):
    from edgetune.arch import arch_of_model_dir

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_bigcode"}))
    with pytest.raises(UnsupportedError) as ei:
        arch_of_model_dir(tmp_path)
    assert "gpt_bigcode" in ei.value.message and "llama" in ei.value.fix and "qwen2" in ei.value.fix


def test_tiny_model_fixture_runs(tiny_llama_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


@pytest.mark.slow
@pytest.mark.precision
def test_demo_model_matches_its_gguf(demo_model_dir: Path, demo_gguf_path: Path):
    """The saved demo model holds the GGUF's de-quantized tensors exactly, its tokenizer, and behaves
    like the fp32 GGUF model within the stated top-1/KL bounds, computing in the policy's dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgetune.demo_model import (
        MAX_KL,
        MIN_TOP1,
        behaviour_drift,
        check_tensors,
        check_tokenizer,
        greedy_answers,
        load_from_gguf,
    )
    from edgetune.precision import decide

    ref, clean, ref_tok = load_from_gguf(demo_gguf_path)
    assert check_tensors(demo_model_dir, clean.state_dict()) > 100
    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    assert check_tokenizer(tok, ref_tok) >= 4
    saved = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=decide("score", "cpu").torch_dtype).eval()
    answers = greedy_answers(ref, ref_tok)
    assert "Paris" in ref_tok.decode(answers[0])
    top1, kl, n = behaviour_drift(ref, ref_tok, saved, answers)
    assert n >= 50 and top1 >= MIN_TOP1 and kl <= MAX_KL, (top1, kl)
    source = (demo_model_dir / "SOURCE.md").read_text()
    assert "Apache-2.0" in source and "sha256" in source


@pytest.mark.slow
def test_a_corrupted_demo_tensor_fails_both_checks(demo_model_dir: Path, demo_gguf_path: Path, tmp_path: Path):
    """One damaged weight matrix: the exact check names the tensor, the behaviour check sees it too."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from edgetune.demo_model import (
        MAX_KL,
        MIN_TOP1,
        behaviour_drift,
        check_tensors,
        greedy_answers,
        load_from_gguf,
    )
    from edgetune.errors import EdgetuneError

    ref, clean, ref_tok = load_from_gguf(demo_gguf_path)
    bad_dir = tmp_path / "bad"
    shutil.copytree(demo_model_dir, bad_dir)
    sd = load_file(str(bad_dir / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    g = torch.Generator().manual_seed(0)
    sd[name] = sd[name][torch.randperm(sd[name].shape[0], generator=g)]  # rows shuffled: a mis-ordered save
    save_file(sd, str(bad_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(EdgetuneError, match=name):
        check_tensors(bad_dir, clean.state_dict())
    bad = AutoModelForCausalLM.from_pretrained(bad_dir, dtype=torch.float32).eval()
    top1, kl, _n = behaviour_drift(ref, ref_tok, bad, greedy_answers(ref, ref_tok))
    assert top1 < MIN_TOP1 or kl > MAX_KL, (top1, kl)


@pytest.mark.slow
def test_fetch_demo_is_idempotent(demo_model_dir: Path):
    from edgetune.demo_model import fetch_demo

    before = (demo_model_dir / "model.safetensors").stat().st_mtime_ns
    fetch_demo(demo_model_dir)
    assert (demo_model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_artifacts_get_umask_modes_not_tempfile_modes(tmp_path: Path):
    # mkstemp/mkdtemp create 0600/0700: a GGUF written like that is unreadable to an Ollama or
    # llama-server running as another user
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "m.gguf") as tmp:
            tmp.write_bytes(b"GGUF")
        with atomic_dir(tmp_path / "adapter") as tmp:
            (tmp / "adapter_config.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "m.gguf").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755


@pytest.mark.slow
def test_committed_tokenizer_fixture_is_what_fetch_demo_writes(demo_model_dir: Path, tokenizer_dir: Path):
    """The fast tests' SmolLM2 tokenizer (tests/fixtures) is the demo model's, file for file."""
    from transformers import AutoTokenizer

    from edgetune.demo_model import check_tokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tokenizer_dir / name).read_bytes() == (demo_model_dir / name).read_bytes(), name
    assert check_tokenizer(AutoTokenizer.from_pretrained(tokenizer_dir), AutoTokenizer.from_pretrained(demo_model_dir)) >= 4


def test_removed_setting_export_adapter_gguf():
    """export.adapter_gguf was never read and is gone; old run.yaml files (adapter_gguf: false) still load."""
    from edgetune.config import ExportConfig

    assert "adapter_gguf" not in {f.name for f in dataclasses.fields(ExportConfig)}
    cfg = config_from_dict({"export": {"adapter_gguf": False, "quants": ["q8_0"]}})
    assert cfg.export.quants == ["q8_0"]
    with pytest.raises(EdgetuneError, match="export.adapter_gguf .* was removed") as ei:
        config_from_dict({"export": {"adapter_gguf": True}})
    assert "edgetune export adapter" in ei.value.fix
