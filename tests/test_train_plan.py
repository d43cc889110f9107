"""Backend selection, batch planning, LR schedule and memory estimate (no model loaded)."""

from __future__ import annotations

import json
import random

import pytest

from edgetune.config import TrainConfig
from edgetune.errors import UnsupportedError
from edgetune.hardware import Hardware
from edgetune.train import estimate_memory
from edgetune.train.batching import IGNORE, TokenizedExample, lr_lambda, padding_fraction, plan_epoch
from edgetune.train.select import choose_backend


def hw(**kw) -> Hardware:
    base = dict(os="Linux", machine="x86_64", cpu_count=2, apple_silicon=False, torch="2.13.0")
    base.update(kw)
    return Hardware(**base)


def test_auto_dispatch_order():
    apple = hw(os="Darwin", machine="arm64", apple_silicon=True, mlx="0.30", mlx_lm="0.30", mps=True)
    assert choose_backend("auto", "lora", apple).backend == "mlx"
    cuda = hw(cuda=True, cuda_devices=[{"name": "H100", "memory_gb": 80}], bitsandbytes="0.45")
    assert choose_backend("auto", "qlora", cuda).device == "cuda"
    assert choose_backend("auto", "lora", hw()).device == "cpu"
    assert choose_backend("auto", "qlora", hw(mlx="0.30", mlx_lm="0.30")).backend == "mlx"


def test_qlora_without_cuda_says_what_works():
    with pytest.raises(UnsupportedError) as exc:
        choose_backend("torch", "qlora", hw(mlx="0.30", mlx_lm="0.30"))
    assert "CUDA" in exc.value.message and "--backend mlx" in exc.value.fix and "lora|dora" in exc.value.fix
    with pytest.raises(UnsupportedError, match="mlx"):
        choose_backend("mlx", "lora", hw())


def _examples(n=40, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        L = rng.randint(5, 60)
        p = rng.randint(1, L - 2)
        out.append(TokenizedExample(list(range(1, L + 1)), [0] * p + [1] * (L - p)))
    return out


@pytest.mark.parametrize("packing", [True, False])
def test_plan_covers_every_example_once_and_is_deterministic(packing):
    exs = _examples()
    kw = dict(batch_size=4, max_seq_len=64, packing=packing, group_by_length=not packing, pad_id=0, seed=3)
    a = plan_epoch(exs, epoch=0, **kw)
    assert [b.input_ids.tolist() for b in a] == [b.input_ids.tolist() for b in plan_epoch(exs, epoch=0, **kw)]
    assert [b.input_ids.tolist() for b in a] != [b.input_ids.tolist() for b in plan_epoch(exs, epoch=1, **kw)]
    assert sum(b.n_tokens for b in a) == sum(len(e.ids) for e in exs)
    assert sum(b.n_target for b in a) == sum(sum(e.mask[1:]) for e in exs)
    for b in a:
        assert b.input_ids.shape[1] <= 64 and b.input_ids.shape[0] <= 4
        # the number of position-0 starts counts the examples (padding restarts too, so at least)
        assert int((b.labels != IGNORE).sum()) == b.n_target


def test_packing_wastes_less_than_padding():
    exs = _examples(80)
    kw = dict(batch_size=4, max_seq_len=128, group_by_length=False, pad_id=0, seed=0, epoch=0)
    packed = plan_epoch(exs, packing=True, **kw)
    padded = plan_epoch(exs, packing=False, **kw)
    assert padding_fraction(packed) < padding_fraction(padded)
    assert len(packed) < len(padded)


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(100, 10, "cosine")
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    assert lr_lambda(100, 0, "linear")(50) == pytest.approx(0.5)
    assert lr_lambda(100, 0, "constant")(99) == 1.0


def test_memory_estimate_scales_sensibly(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}))
    base = estimate_memory(tmp_path, TrainConfig(batch_size=4, max_seq_len=256), precision="bf16")
    assert 0.12 < base["params_b"] < 0.15  # SmolLM2-135M
    bigger = estimate_memory(tmp_path, TrainConfig(batch_size=8, max_seq_len=256), precision="bf16")
    assert bigger["activations_gb"] > base["activations_gb"] and bigger["weights_gb"] == base["weights_gb"]
    ckpt = estimate_memory(tmp_path, TrainConfig(batch_size=4, max_seq_len=256, gradient_checkpointing=True), precision="bf16")
    assert ckpt["activations_gb"] < base["activations_gb"]
    q = estimate_memory(tmp_path, TrainConfig(method="qlora"))
    assert q["weights_gb"] < base["weights_gb"] and q["precision"] == "4bit"
    dora = estimate_memory(tmp_path, TrainConfig(method="dora"), precision="bf16")
    assert dora["trainable_params_m"] > base["trainable_params_m"]
