"""DPO / ORPO on the MLX backend (issue 13): parity with the torch losses on the same weights, the
adapter-disabled reference, and tiny end-to-end runs (early stopping on reward accuracy, QLoRA, resume).

Parity: the tiny llama built from the arch table's row, one set of LoRA/DoRA weights in mlx-lm's
layers and the same weights in PEFT (converted exactly by ``train/convert.py``), one preference batch.
Tolerances, all fp32: per-pair losses, reward margins and log-odds within 1e-5 absolute (measured
<= 2.3e-6: the two frameworks sum the same products in different orders); per-sequence log-prob
sums (about -150) within 1e-5 + 1e-6 relative, i.e. about one fp32 spacing at that size (the
spacing at 128-256 is 1.5e-5; measured: one spacing); LoRA gradients within 1e-5 absolute + 1e-4
relative (measured <= 1.2e-6 on gradients up to 0.4).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.mlx

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("mlx_lm")

from edgetune.config import TrainConfig  # noqa: E402
from edgetune.train import train  # noqa: E402
from edgetune.train.objectives import get  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# a short system turn: SmolLM2's template otherwise adds its ~30-token default one, and mlx on this
# CPU spends most of a step in the LM head over every position
PAIRS = [
    {"prompt": [{"role": "system", "content": "Triage."}, {"role": "user", "content": f"Ticket {i}: order {i} is late"}],
     "chosen": f'{{"category": "shipping", "id": {i}}}',
     "rejected": f"I think this is about billing, maybe {i}."}
    for i in range(12)
]


def write_pairs(d: Path, train_rows, valid_rows=None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    if valid_rows:
        (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in valid_rows))
    return d


@pytest.fixture(scope="module")
def tiny_arch_llama(tmp_path_factory, tokenizer_dir, build_tiny_model):
    """The tiny llama with the config values the arch table lists for its row."""
    from edgetune.arch import ARCHITECTURES

    return build_tiny_model(tmp_path_factory.mktemp("tiny-arch-llama"), tokenizer_dir, "llama",
                            **ARCHITECTURES["llama"].tiny_config)


def pair_batch(model_dir: Path, tmp_path: Path, n_pairs: int):
    from edgetune.data.template import load_tokenizer
    from edgetune.train.batching import encode_pairs, plan_pairs

    # every other pair swapped: a random adapter that favours one style then wins some pairs, loses others
    rows = [r if i % 2 else {**r, "chosen": r["rejected"], "rejected": r["chosen"]} for i, r in enumerate(PAIRS[:n_pairs])]
    d = write_pairs(tmp_path / "pairs", rows)
    ex, _ = encode_pairs(d / "train.jsonl", load_tokenizer(model_dir), 256)
    return plan_pairs(ex, batch_size=n_pairs, max_seq_len=256, packing=False, group_by_length=False, pad_id=0,
                      seed=0, epoch=0)[0]


def twin_models(model_dir: Path, tmp_path: Path, method: str):
    """(mlx-lm model, PEFT model) holding the same base and the same non-zero adapter weights, fp32."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from peft import PeftModel

    from edgetune.train import mlx_backend as mb
    from edgetune.train import torch_backend as tb
    from edgetune.train.convert import mlx_to_peft

    cfg = TrainConfig(method=method, precision="fp32", dropout=0.0, rank=4, alpha=8.0)
    model, native = mb.build_model(model_dir, cfg, TARGETS)
    rng = np.random.default_rng(0)
    params = []
    for k, v in tree_flatten(model.trainable_parameters()):
        if k.endswith("lora_b"):  # B starts at zero: the adapter must change the model
            v = mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32))
        elif k.endswith(".m"):  # DoRA magnitudes off their initial row norms, so they matter too
            v = v * mx.array(rng.uniform(0.8, 1.2, v.shape).astype(np.float32))
        params.append((k, v))
    model.update(tree_unflatten(params))
    model.eval()
    (tmp_path / "mlx").mkdir()
    mb._save_native(tmp_path / "mlx", model, native)
    mlx_to_peft(tmp_path / "mlx", tmp_path / "peft", model_dir)
    peft = PeftModel.from_pretrained(tb.load_model(model_dir, cfg, "cpu", "fp32"), str(tmp_path / "peft"),
                                     is_trainable=True)
    peft.eval()
    return model, peft


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_mlx_losses_metrics_and_gradients_equal_torch(tiny_arch_llama, tmp_path, method):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from edgetune.train import mlx_backend as mb
    from edgetune.train import torch_backend as tb

    model, peft = twin_models(tiny_arch_llama, tmp_path, method)
    batch = pair_batch(tiny_arch_llama, tmp_path, 4)
    t_arrays = {k: torch.from_numpy(v) for k, v in vars(batch).items() if isinstance(v, np.ndarray)}
    m_arrays = {k: mx.array(v) for k, v in vars(batch).items() if isinstance(v, np.ndarray)}
    n = batch.n_target
    leaf = {"lora_a": "lora_A.default.weight", "lora_b": "lora_B.default.weight",
            "m": "lora_magnitude_vector.default.weight"}
    # GRPO on the same rows (a completion is scored where the pair's answer is): advantages, and old /
    # reference log-probs off the current ones so that ratios clip and the KL term is non-zero
    rng = np.random.default_rng(1)
    with torch.no_grad():
        lp, mask = tb.token_logps(peft, t_arrays["input_ids"], t_arrays["position_ids"], t_arrays["labels"])
    grpo = {"advantages": rng.normal(0, 1, lp.shape[0]).astype(np.float32),
            "old_logps": (lp.numpy() + rng.normal(0, 0.3, lp.shape) * mask.numpy()).astype(np.float32),
            "ref_logps": (lp.numpy() + rng.normal(0, 0.3, lp.shape) * mask.numpy()).astype(np.float32)}
    cases = [("dpo", {"beta": 0.1}), ("dpo", {"beta": 0.1, "rpo_alpha": 1.0}), ("orpo", {"orpo_lambda": 0.1})]
    cases += [("grpo", {"beta": 0.04, "loss_type": t, "epsilon": 0.2, "max_completion_length": 32})
              for t in ("grpo", "dapo", "dr_grpo")]
    for objective, kw in cases:
        peft.zero_grad()
        extra = grpo if objective == "grpo" else {}
        ta = {**t_arrays, **{k: torch.from_numpy(v) for k, v in extra.items()}}
        ma = {**m_arrays, **{k: mx.array(v) for k, v in extra.items()}}
        t_loss, t_metrics = get(objective).loss_for("torch")(peft, ta, **kw)
        t_loss.backward()
        t_grads = {k: p.grad.numpy() for k, p in peft.named_parameters() if p.requires_grad}

        def m_fn(mdl, arrays, objective=objective, kw=kw):
            return get(objective).loss_for("mlx")(mdl, arrays, **kw)

        (m_loss, m_metrics), m_grads = nn.value_and_grad(model, m_fn)(model, ma)
        if objective == "grpo":
            assert t_metrics["clip_fraction"].item() > 0 and t_metrics["kl"].item() > 0
        assert set(m_metrics) == set(t_metrics), objective
        np.testing.assert_allclose(m_loss.item() / n, t_loss.item() / n, rtol=0, atol=1e-5, err_msg=objective)
        for k in t_metrics:
            t, m = t_metrics[k].item() / n, m_metrics[k].item() / n
            if k.startswith("logps_"):
                np.testing.assert_allclose(m, t, rtol=1e-6, atol=1e-5, err_msg=f"{objective} {k}")
            elif k == "reward_accuracy":
                assert m == t and 0 < t < 1, (objective, t)  # a mixed batch: the comparison can fail
            else:
                np.testing.assert_allclose(m, t, rtol=0, atol=1e-5, err_msg=f"{objective} {k}")
        m_grads = dict(tree_flatten(m_grads))
        assert len(m_grads) == len(t_grads) > 0
        for k, g in m_grads.items():
            prefix, name = k.rsplit(".", 1)
            g = np.array(g) if name == "m" else np.array(g).T  # mlx-lm stores lora_a/b transposed
            want = t_grads[f"base_model.model.{prefix}.{leaf[name]}"]
            # GRPO's dapo/dr_grpo sums are over every token (x ~100 a DPO pair's): the same fp32 accuracy, scaled
            atol = 1e-5 * max(1.0, float(np.abs(want).max())) if objective == "grpo" else 1e-5
            np.testing.assert_allclose(g, want, rtol=1e-4, atol=atol, err_msg=f"{objective} {kw} {k}")
    # DPO's reference is the adapter-free base: bypassing the adapter gives the base model's logits,
    # and the model is adapted again afterwards
    from mlx_lm.utils import load_model

    base, _ = load_model(Path(tiny_arch_llama))
    base.set_dtype(mx.float32)
    ids = m_arrays["input_ids"][:2]
    adapted = model(ids)
    with mb.adapter_disabled(model):
        bypassed = model(ids)
    np.testing.assert_array_equal(np.array(bypassed), np.array(base(ids)))
    assert float(mx.abs(adapted - bypassed).max()) > 1e-3
    np.testing.assert_array_equal(np.array(model(ids)), np.array(adapted))
    if method == "dora":
        return
    # gradient checkpointing recomputes the blocks (reference pass included): same DPO loss and gradients
    # (on one pair: mlx on this CPU spends ~1.7 s on a forward of the 8-row batch, mostly in the LM head)
    one = {k: v[mx.array([0, n])] for k, v in m_arrays.items()}
    (l0, _), g0 = nn.value_and_grad(model, lambda mdl, a: get("dpo").loss_for("mlx")(mdl, a, beta=0.1))(model, one)
    mb.checkpoint_layers(model)
    (l1, _), g1 = nn.value_and_grad(model, lambda mdl, a: get("dpo").loss_for("mlx")(mdl, a, beta=0.1))(model, one)
    assert l1.item() == pytest.approx(l0.item(), rel=1e-6)
    g0, g1 = dict(tree_flatten(g0)), dict(tree_flatten(g1))
    for k in g0:
        np.testing.assert_allclose(np.array(g1[k]), np.array(g0[k]), rtol=1e-4, atol=1e-6, err_msg=k)


def test_loss_params_bound_on_mlx():
    from edgetune.train import mlx_backend, objectives
    from edgetune.train.objectives import dpo as dpo_mod
    from edgetune.train.objectives import orpo as orpo_mod

    cfg = TrainConfig(objective="dpo", beta=0.5, orpo_lambda=0.25, rpo_alpha=0.5)
    dpo, orpo = objectives.get("dpo").loss_for("mlx", cfg), objectives.get("orpo").loss_for("mlx", cfg)
    assert (dpo.func, dpo.keywords) == (dpo_mod.loss, {"beta": 0.5, "rpo_alpha": 0.5})
    assert (orpo.func, orpo.keywords) == (orpo_mod.loss, {"orpo_lambda": 0.25})
    assert isinstance(dpo.args[0], mlx_backend.MLXKit) and isinstance(orpo.args[0], mlx_backend.MLXKit)


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_mlx_dpo_trains_and_stops_early_on_reward_accuracy(tiny_llama_dir, tmp_path):
    data = write_pairs(tmp_path / "d", PAIRS[2:8], PAIRS[:2])
    cfg = TrainConfig(backend="mlx", objective="dpo", iters=12, batch_size=2, max_seq_len=64, learning_rate=2e-3,
                      warmup_ratio=0.0, dropout=0.0, eval_every=1, early_stopping_patience=2)
    out = tmp_path / "run"
    res = train(tiny_llama_dir, data, out, cfg)
    rows = _rows(out)
    assert {"reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected", "val_reward_accuracy"} <= rows[0].keys()
    # step 1: the adapter's B is zero, so the policy is the reference: rewards 0, loss ln 2
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[0]["reward_margin"] == 0.0
    assert rows[-1]["reward_margin"] > 0 and rows[-1]["loss"] < math.log(2)
    val = [r["val_reward_accuracy"] for r in rows]
    best = val.index(max(val)) + 1
    assert res.stopped_early and res.steps == best + 2 < 12  # two evaluations without improvement
    assert res.adapter_from == f"best@{best}" and res.extra["monitor"] == "val_reward_accuracy"
    # reward accuracy, not the loss, picked the checkpoint: the valid loss still fell after it
    assert rows[-1]["val_loss"] < rows[best - 1]["val_loss"]
    name, ckpt = "adapters.safetensors", out / "checkpoints"
    assert (out / "adapter_mlx" / name).read_bytes() == (ckpt / "best" / name).read_bytes() != (ckpt / "last" / name).read_bytes()
    assert json.loads((out / "run.json").read_text())["resolved"]["objective"] == "dpo"


@pytest.mark.parametrize(("objective", "method"), [("orpo", "dora"), ("dpo", "qlora")])
def test_mlx_preference_methods(tiny_llama_dir, tmp_path, objective, method):
    # mlx's quantized matmuls are slow on this CPU (the tied head too): fewer, smaller QLoRA steps
    steps, pairs = (2, 1) if method == "qlora" else (4, 2)
    data = write_pairs(tmp_path / "d", PAIRS[:4])
    cfg = TrainConfig(backend="mlx", objective=objective, method=method, iters=steps, batch_size=pairs, max_seq_len=64,
                      learning_rate=2e-2, warmup_ratio=0.0, eval_every=0)
    out = tmp_path / "run"
    res = train(tiny_llama_dir, data, out, cfg)
    assert res.steps == steps
    rows = _rows(out)
    if objective == "dpo":  # the reference is the quantized base with the adapter bypassed: equal at step 1
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert json.loads((out / "adapter_mlx" / "adapter_config.json").read_text())["base_quantization"]["bits"] == 4
    else:
        assert "log_odds_ratio" in rows[0] and "nll" in rows[0]
        assert json.loads((out / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    first, last = rows[0], rows[-1]
    assert last["logps_chosen"] - last["logps_rejected"] > first["logps_chosen"] - first["logps_rejected"]


def test_mlx_dpo_resume_matches_uninterrupted(tiny_llama_dir, tmp_path):
    import os
    import signal

    from edgetune.train.common import TrainingInterrupted

    data = write_pairs(tmp_path / "d", PAIRS[:4])
    cfg = TrainConfig(backend="mlx", objective="dpo", iters=4, batch_size=1, max_seq_len=64, learning_rate=1e-2,
                      eval_every=0)
    full = train(tiny_llama_dir, data, tmp_path / "full", cfg)

    def interrupt(step, row):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(tiny_llama_dir, data, tmp_path / "cut", cfg, on_step=interrupt)
    resumed = train(tiny_llama_dir, data, tmp_path / "cut", cfg, resume=True)
    assert resumed.steps == 4 and resumed.tokens_seen == full.tokens_seen
    a, b = _rows(tmp_path / "full"), _rows(tmp_path / "cut")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for k in ("loss", "reward_margin", "logps_chosen", "logps_rejected"):
        assert [r[k] for r in b] == pytest.approx([r[k] for r in a], rel=1e-4, abs=1e-6), k
    assert a[-1]["reward_margin"] != 0.0  # the steps after the resume point learned something
