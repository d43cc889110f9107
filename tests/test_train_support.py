"""Every TrainConfig field is honoured or refused on each backend (train/support.py); the shared loop.

The table test walks the dataclass, so a new field without a row fails here. Refusals are checked
before any model loads; honoured fields are checked by their effect on a tiny real training run
per backend (adapter files, metrics rows, checkpoints, the backend's optimizer and model).
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import fields
from pathlib import Path

import pytest

from edgetune.config import CHOICES, TrainConfig
from edgetune.errors import EdgetuneError
from edgetune.train import objectives, support

LONG = " ".join(["word"] * 120)


def rows(n_short=8):
    out = [{"messages": [{"role": "user", "content": f"Question {i}: " + "x " * (i % 4)},
                         {"role": "assistant", "content": "Answer " + "y " * (1 + i % 3)}]} for i in range(n_short)]
    # a prompt longer than max_seq_len 48: truncation leaves no completion, so the row is dropped
    out.append({"prompt": LONG, "completion": "never seen"})
    return out


def write_data(d: Path, train_rows, valid_rows) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in valid_rows))
    return d


def test_every_field_has_a_row_for_every_backend():
    assert set(support.SUPPORT) == {f.name for f in fields(TrainConfig)}
    for name, row in support.SUPPORT.items():
        assert set(row) == set(support.BACKENDS), name
        for cell in row.values():
            assert (isinstance(cell, str) and cell) or isinstance(cell, support.Refuse), name
    assert CHOICES["train.objective"] == tuple(objectives.OBJECTIVES)


# (field, backend) -> a value that backend refuses, plus the settings that make it refused
REFUSED = {
    ("method", "torch"): ("full", {}),
    ("method", "mlx"): ("full", {}),
    ("packing", "mlx"): (True, {}),
    ("packing", "torch"): (True, {"objective": "dpo"}),  # preference pairs are padded, never packed
    ("group_by_length", "torch"): (True, {}),  # torch packs by default
    ("group_by_length", "mlx"): (True, {"packing": True}),  # refused on packing first, which is also right
    ("num_threads", "mlx"): (2, {}),
}


def test_every_refusal_is_tested():
    refusing = {(n, b) for n, row in support.SUPPORT.items() for b, c in row.items() if isinstance(c, support.Refuse)}
    assert refusing == set(REFUSED)


@pytest.mark.parametrize("key", sorted(REFUSED), ids=lambda k: f"{k[0]}-{k[1]}")
def test_refused_settings_fail_before_loading_with_field_backend_and_fix(key, tiny_llama_dir, tmp_path, monkeypatch):
    name, backend = key
    if backend == "mlx":
        pytest.importorskip("mlx_lm")
    from edgetune.train import loop, train

    def boom(*a, **k):
        raise AssertionError("the loop started")

    monkeypatch.setattr(loop, "run", boom)
    value, extra = REFUSED[key]
    cfg = TrainConfig(backend=backend, **{name: value, **extra})
    data = write_data(tmp_path / "d", rows(), rows(2))
    with pytest.raises(EdgetuneError) as exc:
        train(tiny_llama_dir, data, tmp_path / "out", cfg)
    msg = exc.value.message
    assert f"{backend} backend" in msg and exc.value.fix
    assert f"train.{name}" in msg or (name == "group_by_length" and "train.packing" in msg)
    assert not (tmp_path / "out").exists()
    # the same value with the backend's other settings is fine where the table says so
    if key == ("group_by_length", "torch"):
        support.resolve(TrainConfig(backend="torch", packing=False, group_by_length=True), "torch")


def test_defaults_resolve_per_backend():
    t = support.resolve(TrainConfig(), "torch")
    m = support.resolve(TrainConfig(), "mlx")
    assert (t.packing, t.group_by_length) == (True, False)
    assert (m.packing, m.group_by_length) == (False, True)
    assert support.resolve(TrainConfig(group_by_length=False), "mlx").group_by_length is False


class FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.logged, self.finished, self.config = [], False, None

    def init(self, project, config, dir):
        self.config = config
        return self

    def log(self, vals, step):
        self.logged.append((step, vals))

    def finish(self):
        self.finished = True


def _state(ckpt: Path, backend: str) -> dict:
    if backend == "mlx":
        return json.loads((ckpt / "state.json").read_text())
    import torch

    return torch.load(ckpt / "trainer_state.pt", weights_only=False)


@pytest.mark.parametrize("backend", ["torch", pytest.param("mlx", marks=pytest.mark.mlx)])
def test_non_default_settings_take_effect(backend, tiny_llama_dir, tmp_path, monkeypatch):
    """One run with (almost) every field off its default; each field's effect is checked."""
    pytest.importorskip("mlx_lm" if backend == "mlx" else "peft")
    import torch

    from edgetune.data.template import load_tokenizer
    from edgetune.train import loop, train
    from edgetune.train.batching import lr_lambda

    seen = {}
    real_run = loop.run

    def spy(backend_obj, *a, **k):
        seen["backend"] = backend_obj
        return real_run(backend_obj, *a, **k)

    monkeypatch.setattr(loop, "run", spy)
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    data = write_data(tmp_path / "d", rows(), rows(3))
    cfg = TrainConfig(
        backend=backend, objective="sft", method="dora", rank=4, alpha=12.0, dropout=0.1,
        target_modules=["q_proj", "v_proj"], learning_rate=5e-3, lr_scheduler="linear", warmup_ratio=0.25,
        iters=4, batch_size=2, grad_accum=2, max_seq_len=48, seed=7, max_grad_norm=0.5, weight_decay=0.1,
        packing=False, group_by_length=True, eval_every=2, save_every=3, precision="fp32",
        gradient_checkpointing=True, report_to="wandb", num_threads=1 if backend == "torch" else None,
    )
    checkpoint_steps = []

    def on_step(step, row):
        if step == 4:  # save_every=3: checkpoints/last holds step 3 until step 4 ends
            checkpoint_steps.append(_state(out / "checkpoints" / "last", backend)["step"])

    out = tmp_path / "run"
    try:
        res = train(tiny_llama_dir, data, out, cfg, on_step=on_step)
        run_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    be = seen["backend"]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    resolved = json.loads((out / "run.json").read_text())["resolved"]
    peft_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    native = json.loads((out / "adapter_mlx" / "adapter_config.json").read_text()) if backend == "mlx" else None
    tok = load_tokenizer(tiny_llama_dir)
    train_ex, dropped = objectives.get("sft").encode(data / "train.jsonl", tok, 48)
    plan = objectives.get("sft").plan(train_ex, batch_size=2, max_seq_len=48, packing=False, group_by_length=True,
                                      pad_id=tok.pad_token_id, seed=7, epoch=0)

    checks = {
        "backend": res.backend == backend == resolved["backend"],
        "objective": resolved["objective"] == "sft",
        "method": peft_cfg["use_dora"] is True,
        "rank": peft_cfg["r"] == 4,
        "alpha": peft_cfg["lora_alpha"] == 12.0,
        "dropout": (native["lora_parameters"]["dropout"] if native else peft_cfg["lora_dropout"]) == 0.1,
        "target_modules": set(peft_cfg["target_modules"]) == {"q_proj", "v_proj"},
        # lr of each step: peak x schedule (linear, 1 warmup step of 4)
        "learning_rate": [r["lr"] for r in metrics] == pytest.approx([5e-3 * lr_lambda(4, 1, "linear")(i) for i in range(4)]),
        "iters": res.steps == 4 and [r["step"] for r in metrics] == [1, 2, 3, 4],
        # 8 kept rows in batches of 2 = 4 batches per epoch; 4 steps x 2 micro-batches = 2 epochs
        "batch_size": resolved["batches_per_epoch"] == 4,
        "grad_accum": metrics[-1]["epoch"] == pytest.approx(2.0),
        "max_seq_len": resolved["dropped_examples"] == dropped == 1,
        # the steps saw the batches of the seed-7, length-grouped, unpacked plan, in its order
        "seed": [r["tokens"] for r in metrics[:2]] == [sum(b.n_tokens for b in plan[:2]), sum(b.n_tokens for b in plan[:4])],
        "max_grad_norm": all(r["grad_norm"] is not None for r in metrics),
        "packing": resolved["packing"] is False and res.padding_fraction > 0,
        "eval_every": [r["step"] for r in metrics if "val_loss" in r] == [2, 4],
        "save_every": checkpoint_steps == [3],
        "report_to": [s for s, _ in wandb.logged] == [1, 2, 3, 4] and wandb.finished and "val_loss" in wandb.logged[1][1],
    }
    checks["lr_scheduler"] = checks["warmup_ratio"] = checks["learning_rate"]
    checks["group_by_length"] = checks["seed"] and resolved["group_by_length"] is True
    if backend == "torch":
        checks["weight_decay"] = be.opt.param_groups[0]["weight_decay"] == 0.1
        checks["precision"] = res.precision == "fp32" and be.model.get_base_model().lm_head.weight.dtype == torch.float32
        checks["gradient_checkpointing"] = be.model.get_base_model().is_gradient_checkpointing
        checks["num_threads"] = run_threads == 1
    else:
        import mlx.core as mx

        checks["weight_decay"] = be.opt.weight_decay == 0.1
        # the tiny model is saved in bf16: fp32 casts the frozen base
        checks["precision"] = be.model.layers[0].mlp.up_proj.weight.dtype == mx.float32
        checks["gradient_checkpointing"] = type(be.model.layers[0]).__name__.startswith("Checkpointed")
    failed = [k for k, ok in checks.items() if not ok]
    assert not failed, failed
    # fields honoured on this backend and not checked here are checked by a named test instead
    elsewhere = {"epochs": "test_epochs_and_early_stopping", "early_stopping_patience": "test_epochs_and_early_stopping",
                 # the preference objectives' parameters: test_train_preference.py (loss binding + TRL parity),
                 # test_train_mlx_preference.py on mlx (loss binding + parity with torch)
                 "beta": "test_loss_params_bound_from_config", "orpo_lambda": "test_loss_params_bound_from_config",
                 "rpo_alpha": "test_dpo_loss_matches_trl_dpotrainer",
                 # GRPO's: test_train_grpo.py (loss vs TRL per loss_type, a run per backend with
                 # num_iterations/beta/rewards, greedy temperature and the completion cap, advantages)
                 **dict.fromkeys(("epsilon", "loss_type"), "test_grpo_loss_matches_trl_grpotrainer"),
                 **dict.fromkeys(("num_generations", "num_iterations", "rewards", "top_p"),
                                 "test_grpo_trains_logs_and_resumes"),
                 **dict.fromkeys(("temperature", "max_completion_length"), "test_settings_take_effect"),
                 "scale_rewards": "test_group_advantages_as_trl_computes_them",
                 # training health and greedy answers: test_train_health.py
                 "spike_factor": "test_loss_spike_is_warned_once_per_episode",
                 **dict.fromkeys(("sample_every", "sample_prompts", "sample_max_tokens"),
                                 "test_samples_every_n_steps_from_the_valid_prompts_and_resume"),
                 **dict.fromkeys(("select_by", "select_by_limit"), "test_select_by_follows_the_metric_not_the_val_loss")}
    honoured = {n for n, row in support.SUPPORT.items()
                if isinstance(row[backend], str) or row[backend].honoured}
    assert honoured == set(checks) | set(elsewhere)


@pytest.mark.parametrize("backend", ["torch", pytest.param("mlx", marks=pytest.mark.mlx)])
def test_epochs_and_early_stopping(backend, tiny_llama_dir, tmp_path):
    pytest.importorskip("mlx_lm" if backend == "mlx" else "peft")
    from edgetune.train import train

    unrelated = {"messages": [{"role": "user", "content": "Unrelated?"}, {"role": "assistant", "content": "Different."}]}
    data = write_data(tmp_path / "d", rows()[:4], [unrelated])
    cfg = TrainConfig(backend=backend, epochs=10.0, batch_size=2, max_seq_len=48, learning_rate=0.5, warmup_ratio=0.0,
                      eval_every=1, early_stopping_patience=1, num_threads=1 if backend == "torch" else None)
    res = train(tiny_llama_dir, data, tmp_path / "run", cfg)
    resolved = json.loads((tmp_path / "run" / "run.json").read_text())["resolved"]
    assert resolved["total_steps"] == 20  # 10 epochs x 2 batches
    assert res.stopped_early and res.steps < 20 and res.adapter_from.startswith("best@")
    best = tmp_path / "run" / "checkpoints" / "best"
    name = "adapters.safetensors" if backend == "mlx" else "adapter_model.safetensors"
    folder = "adapter_mlx" if backend == "mlx" else "adapter"
    assert (tmp_path / "run" / folder / name).read_bytes() == (best / name).read_bytes()


def test_plan_notes_a_refused_setting(tiny_llama_dir):
    pytest.importorskip("mlx_lm")
    from edgetune.config import RunConfig
    from edgetune.pipeline import plan

    p = plan(RunConfig(model=str(tiny_llama_dir), train=TrainConfig(backend="mlx", packing=True)))
    assert any("train.packing" in n and "mlx backend" in n for n in p.notes), p.notes


def neg_loss_objective_loss(kit, lm, arrays):
    """A stand-in for a preference objective's loss: SFT's loss plus a metric to maximise."""
    loss = kit.completion_ce_sum(lm, arrays)
    return loss, {"neg_loss": -loss.detach()}


def test_a_new_objective_is_a_table_row_not_a_loop_edit(tiny_llama_dir, tmp_path, monkeypatch):
    """An objective's metrics are logged per step and on the valid split; best/ follows its monitor."""
    pytest.importorskip("peft")
    from dataclasses import replace

    from edgetune.train import train

    probe = replace(objectives.OBJECTIVES["sft"], name="probe", monitor="neg_loss", maximize=True,
                    loss=neg_loss_objective_loss)
    monkeypatch.setitem(objectives.OBJECTIVES, "probe", probe)
    monkeypatch.setitem(CHOICES, "train.objective", ("sft", "probe"))
    data = write_data(tmp_path / "d", rows()[:4], rows()[:4])
    cfg = TrainConfig(backend="torch", objective="probe", iters=5, batch_size=2, max_seq_len=48, learning_rate=2e-2,
                      warmup_ratio=0.0, dropout=0.0, eval_every=1, early_stopping_patience=100, num_threads=1)
    res = train(tiny_llama_dir, data, tmp_path / "run", cfg)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["neg_loss"] == pytest.approx(-r["loss"], rel=1e-5) for r in metrics)
    val = [r["val_neg_loss"] for r in metrics]
    assert val == pytest.approx([-r["val_loss"] for r in metrics], rel=1e-5)
    assert val[-1] > val[0]  # it learns the valid rows (they are the train rows)
    best = max(range(len(val)), key=val.__getitem__) + 1
    assert res.adapter_from == f"best@{best}" and best > 1
    assert res.extra["monitor"] == "val_neg_loss" and res.extra["best_monitor"] == pytest.approx(max(val))
    assert res.best_val_loss == pytest.approx(metrics[best - 1]["val_loss"])  # still a loss
    resolved = json.loads((tmp_path / "run" / "run.json").read_text())["resolved"]
    assert resolved["objective"] == "probe"
