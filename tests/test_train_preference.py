"""DPO / ORPO on torch (issue 13): encoding, batching, losses vs TRL, a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from edgetune.config import TrainConfig  # noqa: E402
from edgetune.errors import UnsupportedError  # noqa: E402

PAIRS = [
    {"prompt": f"Ticket {i}: my order {i} is late", "chosen": f'{{"category": "shipping", "id": {i}}}',
     "rejected": f"I think this is about billing, maybe {i}."}
    for i in range(24)
]


def write_pairs(d: Path, rows=PAIRS, n_valid=4) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[n_valid:]))
    (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n_valid]))
    return d


def _tok(model_dir):
    from edgetune.data.template import load_tokenizer

    return load_tokenizer(model_dir)


def test_encode_preference_scores_only_the_answer(tiny_llama_dir):
    from edgetune.data.template import encode_example, encode_preference

    tok = _tok(tiny_llama_dir)
    row = {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "earlier answer"},
                      {"role": "user", "content": "b"}], "chosen": "good", "rejected": "bad one"}
    c, r = encode_preference(tok, row)
    # the same conversation as SFT would see it, with the prompt's assistant turn unscored
    full = encode_example(tok, {"messages": row["prompt"] + [{"role": "assistant", "content": "good"}]})
    assert c.input_ids == full.input_ids
    assert 0 < c.n_loss < full.n_loss
    scored = tok.decode([t for t, m in zip(c.input_ids, c.loss_mask, strict=True) if m])
    assert "good" in scored and "earlier" not in scored
    assert "bad one" in tok.decode([t for t, m in zip(r.input_ids, r.loss_mask, strict=True) if m])


def test_plan_pairs_rows_and_units(tiny_llama_dir, tmp_path):
    from edgetune.train.batching import IGNORE, encode_pairs, plan_pairs

    d = write_pairs(tmp_path / "d")
    ex, dropped = encode_pairs(d / "train.jsonl", _tok(tiny_llama_dir), 256)
    assert len(ex) == 20 and dropped == 0
    kw = dict(batch_size=3, max_seq_len=256, packing=False, group_by_length=False, pad_id=0, seed=1)
    batches = plan_pairs(ex, epoch=0, **kw)
    assert all((a.input_ids == b.input_ids).all() for a, b in zip(batches, plan_pairs(ex, epoch=0, **kw), strict=True))
    b = batches[0]
    assert b.input_ids.shape[0] == 6 and b.n_target == 3
    assert b.n_completion == int((b.labels != IGNORE).sum())
    with pytest.raises(Exception, match="not packed"):
        plan_pairs(ex, epoch=0, **{**kw, "packing": True})


def test_support_table_refuses_packing_pairs():
    from edgetune.train import support

    for backend in support.BACKENDS:  # mlx trains dpo/orpo too (tests/test_train_mlx_preference.py)
        assert support.resolve(TrainConfig(objective="dpo"), backend).objective == "dpo"
        with pytest.raises(UnsupportedError, match="packing"):
            support.resolve(TrainConfig(objective="dpo", packing=True), backend)
    with pytest.raises(UnsupportedError, match="packing"):
        support.resolve(TrainConfig(objective="orpo", packing=True), "torch")
    assert support.resolve(TrainConfig(objective="dpo"), "torch").packing is False
    assert support.resolve(TrainConfig(), "torch").packing is True


def test_loss_params_bound_from_config():
    from edgetune.train import objectives

    cfg = TrainConfig(objective="dpo", beta=0.5, orpo_lambda=0.25)
    assert objectives.get("dpo").loss_for("torch", cfg).keywords == {"beta": 0.5, "rpo_alpha": 0.0}
    assert objectives.get("orpo").loss_for("torch", cfg).keywords == {"orpo_lambda": 0.25}
    probe = objectives.Objective("probe", encode=None, plan=None, loss=None, backends=("torch",))
    with pytest.raises(UnsupportedError, match="not implemented on the mlx backend"):
        probe.loss_for("mlx", cfg)


def _model_and_batch(tiny_llama_dir, tmp_path):
    from edgetune.train import torch_backend as tb
    from edgetune.train.batching import encode_pairs, plan_pairs

    torch.manual_seed(0)
    cfg = TrainConfig(backend="torch", precision="fp32", dropout=0.0)
    model = tb.load_model(tiny_llama_dir, cfg, "cpu", "fp32")
    model = tb.add_adapter(model, cfg, ["q_proj", "v_proj"])
    with torch.no_grad():  # non-zero adapter weights, so the policy differs from the reference
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    d = write_pairs(tmp_path / "d")
    ex, _ = encode_pairs(d / "train.jsonl", _tok(tiny_llama_dir), 256)
    b = plan_pairs(ex, batch_size=4, max_seq_len=256, packing=False, group_by_length=False, pad_id=0, seed=0, epoch=0)[0]
    arrays = {k: torch.from_numpy(v) for k, v in vars(b).items() if hasattr(v, "shape")}
    return model, arrays


def _full_logits_logps(model, arrays):
    """Plain reference: every position's logits, log_softmax, gather, mask, sum."""
    out = model(input_ids=arrays["input_ids"], position_ids=arrays["position_ids"], use_cache=False).logits.float()
    labels = arrays["labels"]
    mask = labels != -100
    lp = torch.log_softmax(out, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1), mask.sum(-1).float()


def test_logps_match_a_full_logits_computation(tiny_llama_dir, tmp_path):
    from edgetune.train.torch_backend import sequence_logps

    model, arrays = _model_and_batch(tiny_llama_dir, tmp_path)
    with torch.no_grad():
        sums, counts = sequence_logps(model, arrays["input_ids"], arrays["position_ids"], arrays["labels"])
        ref_sums, ref_counts = _full_logits_logps(model, arrays)
        with model.disable_adapter():
            base_sums, _ = _full_logits_logps(model, arrays)
    # per-sequence sums are ~-150: fp32 spacing there is ~1.5e-5, so 1e-5 absolute plus 1e-6 relative
    # (the head runs on the selected rows only, a different matmul order than the full-logits pass)
    torch.testing.assert_close(sums, ref_sums, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(sums / counts, ref_sums / ref_counts, atol=1e-5, rtol=0)  # per-token: 1e-5 flat
    assert torch.equal(counts, ref_counts)
    assert not torch.allclose(sums, base_sums)  # the adapter matters, so the reference pass is a real test


def _trl_orpo():
    pytest.importorskip("trl", reason="TRL is a test-only reference (not installed here): pip install trl")
    try:
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    except ImportError:
        from trl import ORPOTrainer
    return ORPOTrainer


def _trl_inputs(arrays):
    """Our pair batch as TRL's DPO collator lays one out: right-padded ``input_ids``, ``attention_mask``
    and an UNshifted ``completion_mask`` (token t is scored iff our shifted label at t-1 is)."""
    ids, pos, labels = arrays["input_ids"], arrays["position_ids"], arrays["labels"]
    # real length = where the positions restart (the padding is its own sequence in our batches)
    restart = (pos[:, 1:] == 0).int()
    length = torch.where(restart.any(1), restart.argmax(1) + 1, torch.full_like(restart[:, 0], ids.shape[1]))
    attention = (torch.arange(ids.shape[1])[None, :] < length[:, None]).long()
    completion = torch.zeros_like(ids)
    completion[:, 1:] = (labels[:, :-1] != -100).long()
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


@pytest.mark.parametrize("rpo_alpha", [0.0, 1.0], ids=["dpo", "dpo+nll"])
def test_dpo_loss_matches_trl_dpotrainer(tiny_llama_dir, tmp_path, rpo_alpha):
    """TRL's own ``DPOTrainer.compute_loss`` (sigmoid loss, PEFT model, reference = adapter disabled,
    fused LM head) on the same model, adapter weights and batch as ours, fp32: equal within 1e-5.
    With ``rpo_alpha``: TRL's ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, rpo_alpha]`` (the
    RPO loss, once TRL's ``rpo_alpha``)."""
    pytest.importorskip("trl", reason="TRL is a test-only reference (not installed here): pip install trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from edgetune.train.objectives import get

    dpo_loss = get("dpo").loss_for("torch")

    model, arrays = _model_and_batch(tiny_llama_dir, tmp_path)
    beta = 0.1
    with torch.no_grad():
        loss_sum, metrics = dpo_loss(model, arrays, beta=beta, rpo_alpha=rpo_alpha)
        plain_sum, _ = dpo_loss(model, arrays, beta=beta)
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in PAIRS[:4]]
    losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, rpo_alpha]} if rpo_alpha else {"loss_type": ["sigmoid"]}
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, **losses, report_to="none", use_cpu=True,
                     bf16=False, fp16=False, per_device_train_batch_size=4, precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=_tok(tiny_llama_dir))
    # Handed a PEFT model whose adapter is already trained, TRL copies it as a frozen "ref" adapter (its
    # SFT-then-DPO reference: the policy at the start). Ours is the base with the adapter disabled (a fresh
    # adapter; after SFT the align stage merges the SFT adapter into the base first), which is TRL's path
    # for a fresh adapter: without a "ref" adapter it disables adapters. Drop the copy to take that path.
    trainer.model.delete_adapter("ref")
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, _trl_inputs(arrays))
    b = arrays["input_ids"].shape[0] // 2
    assert abs(trl_loss.item()) > 1e-3  # a real loss, not a degenerate zero
    torch.testing.assert_close(loss_sum / b, trl_loss.detach(), atol=1e-5, rtol=0)
    assert (loss_sum - plain_sum).item() > 0.1 if rpo_alpha else torch.equal(loss_sum, plain_sum)  # the NLL term is really there
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    torch.testing.assert_close(metrics["reward_accuracy"].item() / b, logged["rewards/accuracies"], atol=1e-6, rtol=0)
    torch.testing.assert_close(metrics["reward_margin"].item() / b, logged["rewards/margins"], atol=1e-5, rtol=0)


def test_orpo_loss_matches_trl(tiny_llama_dir, tmp_path):
    """The odds-ratio term is TRL's ``ORPOTrainer.odds_ratio_loss`` itself (called unbound on a stub
    holding ``beta``), on per-token average log-probs from its ``get_batch_logps``. TRL's NLL is one
    token-mean over the whole chosen half of the batch and over prompt + response (its comment:
    "computed over the full prompt and response"); ours is the per-pair mean over the completion
    tokens only (prompt tokens are never scored), so the NLL is compared per pair, batch size 1."""
    ORPOTrainer = _trl_orpo()
    from edgetune.train.objectives import get

    orpo_loss = get("orpo").loss_for("torch")

    model, arrays = _model_and_batch(tiny_llama_dir, tmp_path)
    lam = 0.1
    stub = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device="cpu"))
    with torch.no_grad():
        loss_sum, metrics = orpo_loss(model, arrays, orpo_lambda=lam)
        labels = arrays["labels"]
        unshifted = torch.cat([torch.full_like(labels[:, :1], -100), labels[:, :-1]], dim=1)
        logits = model(input_ids=arrays["input_ids"], position_ids=arrays["position_ids"]).logits.float()
        avg = ORPOTrainer.get_batch_logps(logits, unshifted, average_log_prob=True)
        b = avg.shape[0] // 2
        or_losses, rc, rr, _, log_odds = ORPOTrainer.odds_ratio_loss(stub, avg[:b], avg[b:])
        # TRL's NLL for each chosen row alone (batch size 1), on the completion tokens
        nll = torch.stack([torch.nn.functional.cross_entropy(logits[i][labels[i] != -100], labels[i][labels[i] != -100])
                           for i in range(b)])
    trl_loss = (nll - or_losses).mean()
    torch.testing.assert_close(loss_sum / b, trl_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(metrics["log_odds_ratio"] / b, log_odds, atol=1e-5, rtol=0)
    assert metrics["reward_accuracy"].item() == (rc > rr).float().sum().item()


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_cli_train_preference_end_to_end(tiny_llama_dir, tmp_path, objective):
    from click.testing import CliRunner

    from edgetune.cli import cli

    d = write_pairs(tmp_path / "d")
    out = tmp_path / "run"
    args = ["train", "-m", str(tiny_llama_dir), "-d", str(d), "-o", str(out), "--objective", objective,
            "--backend", "torch", "--iters", "8", "-b", "4", "--lr", "5e-3", "--eval-every", "4",
            "--save-every", "4", "--precision", "fp32", "--warmup-ratio", "0", "--json"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected"} <= rows[0].keys()
    assert "val_reward_accuracy" in rows[-1]
    first, last = rows[0], rows[-1]
    assert last["loss"] < first["loss"] or last["reward_accuracy"] > first["reward_accuracy"], rows
    assert last["logps_chosen"] - last["logps_rejected"] > first["logps_chosen"] - first["logps_rejected"]
    # resume: a finished run continues from its last checkpoint to a higher --iters
    r2 = CliRunner().invoke(cli, [*args[:args.index("--iters") + 1], "10", *args[args.index("--iters") + 2:], "--resume"])
    assert r2.exit_code == 0, r2.output
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 10
