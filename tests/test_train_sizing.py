"""Row length and step size follow the data when max_seq_len is unset (train/sizing.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from edgetune.config import TrainConfig
from edgetune.train import sizing

UNITS = [("km", "miles", 0.621371), ("kg", "pounds", 2.20462), ("litres", "gallons", 0.264172), ("m", "feet", 3.28084)]


def unit_chats(n: int, seed: int = 0) -> list[dict]:
    """Short chats (~40 tokens with the template), like a user's own unit-conversion task."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, f = rng.choice(UNITS)
        x = rng.randint(1, 500)
        rows.append({"messages": [{"role": "user", "content": f"Convert {x} {a} to {b}."},
                                  {"role": "assistant", "content": f"{x} {a} is {x * f:.2f} {b}."}]})
    return rows


def write_split(d: Path, rows) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    return d


@pytest.fixture
def short_data(tmp_path):
    return write_split(tmp_path / "units", unit_chats(60))


def test_default_max_seq_len_follows_the_data(tiny_llama_dir, short_data):
    stats, where = sizing.train_length_stats(tiny_llama_dir, short_data)
    assert where == "train.jsonl tokenized" and stats["count"] == 60 and stats["max"] < 100
    cfg, s = sizing.size(tiny_llama_dir, short_data, TrainConfig(iters=40, batch_size=4), "torch")
    assert cfg.max_seq_len == s.max_seq_len and s.max_seq_len % 64 == 0
    assert stats["max"] <= s.max_seq_len < stats["max"] + 64  # 60 examples: the max, nothing truncated
    assert s.max_seq_len <= 128 and "from the data" in s.max_seq_len_source
    # an explicit value (recipe or --max-seq-len) wins
    cfg, s = sizing.size(tiny_llama_dir, short_data, TrainConfig(max_seq_len=512), "torch")
    assert cfg.max_seq_len == s.max_seq_len == 512 and s.max_seq_len_source.startswith("set")


def test_card_stats_p99_and_caps(tiny_llama_dir, short_data):
    card = {"tokens": {"model": str(tiny_llama_dir),
                       "per_split": {"train": {"count": 1000, "p99": 300, "max": 4000, "mean": 120.0}}}}
    (short_data / "data_card.json").write_text(json.dumps(card))
    cfg, s = sizing.size(tiny_llama_dir, short_data, TrainConfig(), "torch")
    assert s.max_seq_len == 320 and "p99 300" in s.max_seq_len_source and "data_card.json" in s.max_seq_len_source
    assert s.train_examples == 1000
    # long data: capped at 2048, or at the model's context when that is shorter
    assert sizing.seq_len_from_data({"count": 500, "p99": 5000, "max": 9000}, "x", None)[0] == 2048
    assert sizing.seq_len_from_data({"count": 500, "p99": 5000, "max": 9000}, "x", 1024) == (
        1024, "from the data: train p99 5000 tokens (x), rounded up to 64, capped at the model's context 1024")
    # another model's tokenizer counted the card: tokenize instead
    card["tokens"]["model"] = str(short_data)
    (short_data / "data_card.json").write_text(json.dumps(card))
    assert sizing.size(tiny_llama_dir, short_data, TrainConfig(), "torch")[1].train_examples == 60


def _dry_run(model, data, out, *flags):
    from click.testing import CliRunner

    from edgetune.cli import cli

    return CliRunner().invoke(cli, ["train", "-m", str(model), "-d", str(data), "-o", str(out), "--dry-run", *flags])


def test_dry_run_json_reports_the_step(tiny_llama_dir, short_data, tmp_path):
    r = _dry_run(tiny_llama_dir, short_data, tmp_path / "o", "--json", "--iters", "40", "--batch-size", "4")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["max_seq_len"] <= 128 and info["train_examples"] == 60 and info["packing"] is True
    per_row = info["examples_per_row"]
    assert per_row == info["max_seq_len"] // -(-info["mean_tokens"] // 1)
    assert info["examples_per_step"] == 4 * per_row
    assert info["epochs"] == pytest.approx(40 * info["examples_per_step"] / 60, abs=0.01)
    assert info["tokens_per_step"] == pytest.approx(info["examples_per_step"] * info["mean_tokens"], rel=0.02)
    assert info["memory"]["total_gb"] > 0 and info["warnings"] == []
    assert not (tmp_path / "o").exists()
    # the old fixed 2048-token rows: dozens of examples per step, many epochs
    old = json.loads(_dry_run(tiny_llama_dir, short_data, tmp_path / "o", "--json", "--iters", "40", "--batch-size", "4",
                              "--max-seq-len", "2048").output)
    assert old["examples_per_step"] == 60 and old["epochs"] == 40.0


def test_epochs_warning_names_the_flags(tiny_llama_dir, short_data, tmp_path):
    many = _dry_run(tiny_llama_dir, short_data, tmp_path / "o", "--iters", "40", "--batch-size", "4", "--max-seq-len", "2048")
    assert many.exit_code == 0, many.output
    assert "max_seq_len 2048 (set" in many.output and "epochs over 60 training examples" in many.output
    assert "warning:" in many.output
    for flag in ("--iters", "--batch-size", "--max-seq-len", "--no-packing"):
        assert flag in many.output
    sane = _dry_run(tiny_llama_dir, short_data, tmp_path / "o", "--iters", "40", "--batch-size", "4")
    assert sane.exit_code == 0, sane.output
    assert "from the data" in sane.output and "warning:" not in sane.output and "total_gb" in sane.output


def test_training_records_the_resolved_length(tiny_llama_dir, short_data, tmp_path):
    import yaml

    from edgetune.train import train

    cfg = TrainConfig(backend="torch", iters=2, batch_size=2, eval_every=0, save_every=0)
    train(tiny_llama_dir, short_data, tmp_path / "run", cfg)
    saved = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())["train"]
    assert saved["max_seq_len"] % 64 == 0 and saved["max_seq_len"] <= 128


def test_preference_memory_counts_two_sequences_and_the_dpo_reference_pass(tiny_llama_dir, tmp_path):
    """A DPO/ORPO step holds 2 x batch sequences; DPO adds its reference pass, ORPO has none."""
    from edgetune.train.memory import estimate_memory

    kw = dict(batch_size=4, max_seq_len=256, precision="fp32")
    sft, dpo, orpo = (estimate_memory(tiny_llama_dir, TrainConfig(objective=o, **kw)) for o in ("sft", "dpo", "orpo"))
    double = estimate_memory(tiny_llama_dir, TrainConfig(**{**kw, "batch_size": 8}))
    assert sft["sequences_per_step"] == 4 and dpo["sequences_per_step"] == orpo["sequences_per_step"] == 8
    assert orpo["activations_gb"] == double["activations_gb"] > sft["activations_gb"]  # pairs = twice the rows
    assert orpo["reference_pass_gb"] == sft["reference_pass_gb"] == 0 < dpo["reference_pass_gb"]
    assert dpo["total_gb"] > orpo["total_gb"] > sft["total_gb"]
    # weights, adapter and optimizer do not depend on the objective
    assert dpo["weights_gb"] == sft["weights_gb"] and dpo["optimizer_gb"] == sft["optimizer_gb"]


def test_dry_run_prints_the_preference_estimate(tiny_llama_dir, tmp_path):
    from click.testing import CliRunner

    from edgetune.cli import cli

    d = tmp_path / "pairs"
    d.mkdir()
    rows = [{"prompt": f"Ticket {i}: my order is late", "chosen": '{"category": "shipping"}', "rejected": "Maybe billing?"}
            for i in range(12)]
    for split in ("train", "valid"):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["train", "-m", str(tiny_llama_dir), "-d", str(d), "-o", str(tmp_path / "o"), "--backend", "torch",
            "--dry-run", "-b", "2", "--objective", "dpo"]
    r = CliRunner().invoke(cli, [*base, "--json"])
    assert r.exit_code == 0, r.output
    dpo = json.loads(r.output)
    assert dpo["sequences_per_example"] == 2 and dpo["memory"]["sequences_per_step"] == 4
    assert dpo["memory"]["reference_pass_gb"] > 0
    text = CliRunner().invoke(cli, base).output
    assert not (tmp_path / "o").exists()  # a dry run loads and writes nothing
    assert "two rows (chosen, rejected) per pair" in text and "reference_pass_gb" in text
