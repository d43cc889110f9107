"""mlx backend on Linux mlx[cpu]: LoRA/DoRA/QLoRA on the tiny model, exact MLX -> PEFT conversion.

mlx on this CPU is slow (a few GFLOP/s), so runs here are a handful of steps on short sequences.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.mlx

from edgetune.config import TrainConfig  # noqa: E402
from edgetune.train import train  # noqa: E402

ROW = {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]}


def write_data(d: Path, rows, valid=None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if valid:
        (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in valid))
    return d


def mlx_logits(model_dir: Path, adapter_mlx: Path | None, ids: list[int]) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(model_dir))
    model.set_dtype(mx.float32)
    if adapter_mlx is not None:
        load_adapters(model, str(adapter_mlx))
    model.eval()
    return np.array(model(mx.array([ids])).astype(mx.float32))[0]


def peft_logits(model_dir: Path, adapter: Path | None, ids: list[int]) -> np.ndarray:
    torch = pytest.importorskip("torch")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_mlx_trains_and_converts_to_peft_exactly(tiny_llama_dir, tmp_path, method):
    data = write_data(tmp_path / "d", [ROW] * 2, [ROW])
    cfg = TrainConfig(backend="mlx", method=method, iters=5, batch_size=1, max_seq_len=64, learning_rate=2e-2,
                      eval_every=5, warmup_ratio=0.0, dropout=0.0)
    out = tmp_path / "run"
    res = train(tiny_llama_dir, data, out, cfg)
    assert res.backend == "mlx" and res.steps == 5 and res.best_val_loss is not None
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]  # same example every step: it must fit it
    assert (out / "loss.png").exists() and (out / "run.json").exists()
    native = json.loads((out / "adapter_mlx" / "adapter_config.json").read_text())
    assert native["fine_tune_type"] == method and native["lora_parameters"]["scale"] == 2.0
    pcfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert pcfg["use_dora"] is (method == "dora") and pcfg["r"] == 16 and pcfg["lora_alpha"] == 32.0
    assert Path(pcfg["base_model_name_or_path"]) == Path(tiny_llama_dir).resolve()

    ids = [1, 504, 3075, 282, 4649, 47, 198, 1780, 30, 2]
    tuned_mlx = mlx_logits(tiny_llama_dir, out / "adapter_mlx", ids)
    tuned_peft = peft_logits(tiny_llama_dir, out / "adapter", ids)
    base_peft = peft_logits(tiny_llama_dir, None, ids)
    # the adapter does something, and the PEFT form does exactly the same thing
    assert np.abs(tuned_mlx - base_peft).max() > 1e-3
    np.testing.assert_allclose(tuned_peft, tuned_mlx, rtol=1e-4, atol=2e-5)


def test_mlx_qlora_quantizes_the_base(tiny_llama_dir, tmp_path):
    data = write_data(tmp_path / "d", [ROW] * 2)
    cfg = TrainConfig(backend="mlx", method="qlora", iters=3, batch_size=1, max_seq_len=64, learning_rate=2e-2,
                      eval_every=0, warmup_ratio=0.0)
    out = tmp_path / "run"
    res = train(tiny_llama_dir, data, out, cfg)
    assert res.steps == 3
    native = json.loads((out / "adapter_mlx" / "adapter_config.json").read_text())
    assert native["base_quantization"] == {"group_size": 64, "bits": 4}
    note = json.loads((out / "adapter" / "edgetune_adapter.json").read_text())
    assert note["base_quantization"]["bits"] == 4
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_mlx_resume_matches_uninterrupted(tiny_llama_dir, tmp_path):
    import os
    import signal

    from edgetune.train.common import TrainingInterrupted

    data = write_data(tmp_path / "d", [ROW, {"prompt": "Say hi", "completion": "hi"}] * 2)
    cfg = TrainConfig(backend="mlx", iters=4, batch_size=1, max_seq_len=64, learning_rate=1e-2, eval_every=0)
    full = train(tiny_llama_dir, data, tmp_path / "full", cfg)

    def interrupt(step, row):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(tiny_llama_dir, data, tmp_path / "cut", cfg, on_step=interrupt)
    resumed = train(tiny_llama_dir, data, tmp_path / "cut", cfg, resume=True)
    assert resumed.steps == 4 and resumed.tokens_seen == full.tokens_seen
    assert resumed.final_train_loss == pytest.approx(full.final_train_loss, rel=1e-4)


def test_mlx_gradient_checkpointing_keeps_loss_and_gradients(tiny_llama_dir):
    """Checkpointed blocks recompute activations in backward: same loss and LoRA gradients, and
    only the model asked for it is changed (mlx-lm's grad_checkpoint patches the class process-wide)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten

    from edgetune.train.mlx_backend import build_model, checkpoint_layers
    from edgetune.train.objectives import get

    sft_loss = get("sft").loss_for("mlx")

    cfg = TrainConfig(backend="mlx", dropout=0.0)
    ids = [1, 504, 3075, 282, 4649, 47, 198, 1780, 30, 2]
    arrays = {"input_ids": mx.array([ids]), "labels": mx.array([ids[1:] + [-100]])}
    results, models = [], []
    for ckpt in (False, True):
        model, _ = build_model(Path(tiny_llama_dir), cfg, ["q_proj", "v_proj", "down_proj"])  # seeded: same init
        params = tree_flatten(model.trainable_parameters())  # B starts at zero: make the adapter matter
        model.update(tree_unflatten([(k, mx.full(v.shape, 0.05) if k.endswith("lora_b") else v) for k, v in params]))
        if ckpt:
            checkpoint_layers(model)
        (loss, _), grads = nn.value_and_grad(model, sft_loss)(model, arrays)
        results.append((loss.item(), dict(tree_flatten(grads))))
        models.append(model)
    (l0, g0), (l1, g1) = results
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert g0.keys() == g1.keys() and any(float(mx.abs(v).max()) > 0 for k, v in g0.items() if "lora_a" in k)
    for k in g0:
        np.testing.assert_allclose(np.array(g1[k]), np.array(g0[k]), rtol=1e-4, atol=1e-6)
    assert type(models[1].layers[0]).__name__.startswith("Checkpointed")
    assert not type(models[0].layers[0]).__name__.startswith("Checkpointed")
