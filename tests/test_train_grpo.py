"""GRPO (issue 25): prompts from prepared data, advantages, the loss against TRL's GRPOTrainer, a real
run on both backends (sampling, rewards, metrics, validation by reward, resume), bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from edgetune.config import TrainConfig  # noqa: E402
from edgetune.errors import EdgetuneError  # noqa: E402

# chat rows: the last assistant turn is the reference the rewards see
ROWS = [{"messages": [{"role": "system", "content": "Answer with a number."},
                      {"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": str(2 * i)}]} for i in range(12)]


def write_split(d: Path, train_rows, valid_rows=None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    if valid_rows:
        (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in valid_rows))
    return d


def _tok(model_dir):
    from edgetune.data.template import load_tokenizer

    return load_tokenizer(model_dir)


def test_prompts_and_references_from_every_row_kind(tiny_llama_dir, tmp_path):
    from edgetune.data.template import render_prompt
    from edgetune.train.objectives.grpo import encode_prompts, plan_prompts

    tok = _tok(tiny_llama_dir)
    rows = [ROWS[3], {"prompt": "Say hi", "completion": "hi"}, {"prompt": "Pick", "chosen": "A", "rejected": "B"},
            {"messages": [{"role": "user", "content": "call it"},
                          {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}]}]
    ex, dropped = encode_prompts(write_split(tmp_path / "d", rows) / "train.jsonl", tok, None)
    assert dropped == 0 and [e.reference for e in ex][:3] == ["6", "hi", "A"]
    assert json.loads(ex[3].reference)[0]["function"]["name"] == "f"
    assert ex[0].prompt == "What is 3 plus 3?"
    # the prompt is the conversation before the answer, ending with the generation prompt
    want = render_prompt(tok, ROWS[3]["messages"][:2], add_generation_prompt=True)
    assert tok.decode(ex[0].ids) == want and "6" not in want.split("assistant")[-1]
    short, dropped = encode_prompts(tmp_path / "d" / "train.jsonl", tok, 12)
    assert dropped == 4 - len(short) > 0  # longer prompts are dropped, counted
    kw = dict(batch_size=3, max_seq_len=64, packing=False, group_by_length=False, pad_id=0, seed=1)
    a, b = plan_prompts(ex, epoch=0, **kw), plan_prompts(ex, epoch=0, **kw)
    assert [[e.ids for e in x.examples] for x in a] == [[e.ids for e in x.examples] for x in b]
    assert [len(x.examples) for x in a] == [3, 1]
    with pytest.raises(EdgetuneError, match="text row has no prompt"):
        encode_prompts(write_split(tmp_path / "t", [{"text": "plain"}]) / "train.jsonl", tok, None)


def test_group_advantages_as_trl_computes_them():
    from edgetune.train.objectives.grpo import group_advantages

    r = np.array([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0])
    t = torch.tensor(r).view(-1, 4)
    want = ((t - t.mean(1, keepdim=True)) / (t.std(1, keepdim=True) + 1e-4)).view(-1).numpy()  # TRL: unbiased std
    np.testing.assert_allclose(group_advantages(r, 4, "group"), want, rtol=1e-6)
    np.testing.assert_allclose(group_advantages(r, 4, "none"), (t - t.mean(1, keepdim=True)).view(-1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(group_advantages(r, 4, "batch"),
                               (t - t.mean(1, keepdim=True)).view(-1).numpy() / (r.std(ddof=1) + 1e-4), rtol=1e-6)
    assert (group_advantages(r, 4, "group")[4:] == 0).all()  # an all-equal group teaches nothing


def _policy(tiny_llama_dir):
    from edgetune.train import torch_backend as tb

    torch.manual_seed(0)
    cfg = TrainConfig(backend="torch", precision="fp32", dropout=0.0)
    model = tb.add_adapter(tb.load_model(tiny_llama_dir, cfg, "cpu", "fp32"), cfg, ["q_proj", "v_proj"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    return model


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
def test_grpo_loss_matches_trl_grpotrainer(tiny_llama_dir, tmp_path, loss_type):
    """TRL's own ``GRPOTrainer._compute_loss`` on the same PEFT model, completions, advantages, old and
    reference log-probs, fp32 (eval mode: no accumulation normaliser): equal within 1e-5."""
    pytest.importorskip("trl", reason="TRL is a test-only reference (not installed here): pip install trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from edgetune.train import torch_backend as tb
    from edgetune.train.batching import TokenizedExample, _collate
    from edgetune.train.objectives import get

    model = _policy(tiny_llama_dir)
    tok = _tok(tiny_llama_dir)
    prompt = tok("<|im_start|>user\nCount<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    rng = np.random.default_rng(0)
    comps = [list(rng.integers(100, 2000, size=n)) for n in (5, 9, 3, 7)]  # equal prompts: no left padding in TRL
    b = _collate([[TokenizedExample(prompt + c, [0] * len(prompt) + [1] * len(c))] for c in comps], pad_id=0)
    arrays = {k: torch.from_numpy(v) for k, v in vars(b).items() if isinstance(v, np.ndarray)}
    with torch.no_grad():
        lp, mask = tb.token_logps(model, arrays["input_ids"], arrays["position_ids"], arrays["labels"])
    adv = torch.tensor([1.2, -0.7, 0.3, -0.8])
    old = lp + torch.from_numpy(rng.normal(0, 0.3, lp.shape)).float() * mask
    ref = lp + torch.from_numpy(rng.normal(0, 0.3, lp.shape)).float() * mask
    beta, eps, max_len = 0.04, 0.2, 16
    ours, metrics = get("grpo").loss_for("torch")(model, {**arrays, "advantages": adv, "old_logps": old, "ref_logps": ref},
                                                  beta=beta, epsilon=eps, loss_type=loss_type, max_completion_length=max_len)
    units = {"grpo": len(comps), "dr_grpo": len(comps) * max_len}.get(loss_type, int(mask.sum()))

    # TRL's layout: prompt ids + right-padded completion ids, per-token tensors over the completion only
    P, T = len(prompt), max(len(c) for c in comps)
    completion_ids = torch.zeros(len(comps), T, dtype=torch.long)
    completion_mask = torch.zeros(len(comps), T, dtype=torch.long)
    for i, c in enumerate(comps):
        completion_ids[i, : len(c)] = torch.tensor(c)
        completion_mask[i, : len(c)] = 1
    # our per-token arrays sit at the label positions: position P-1+j predicts completion token j
    old_t, ref_t = old[:, P - 1 : P - 1 + T] * completion_mask, ref[:, P - 1 : P - 1 + T] * completion_mask

    def reward(completions, **kw):
        return [0.0] * len(completions)

    args = GRPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, epsilon=eps, loss_type=loss_type, use_cpu=True,
                      bf16=False, fp16=False, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=max_len, report_to="none")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tok,
                          train_dataset=Dataset.from_list([{"prompt": "Count"}] * 4))
    trainer.model.eval()
    inputs = {"prompt_ids": torch.tensor([prompt] * len(comps)), "prompt_mask": torch.ones(len(comps), P, dtype=torch.long),
              "completion_ids": completion_ids, "completion_mask": completion_mask, "advantages": adv,
              "old_per_token_logps": old_t, "ref_per_token_logps": ref_t,
              "num_items_in_batch": completion_mask.sum().float()}
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, inputs)
    assert abs(trl_loss.item()) > 1e-3 and metrics["clip_fraction"].item() > 0
    torch.testing.assert_close(ours.detach() / units, trl_loss.detach(), atol=1e-5, rtol=0)


def _run(model_dir, data, out, **kw):
    from edgetune.train import train

    base = dict(objective="grpo", iters=3, batch_size=2, num_generations=4, max_completion_length=8, learning_rate=5e-3,
                warmup_ratio=0.0, dropout=0.0, eval_every=1, rewards=["number", "length=16:0.1"], seed=3)
    return train(model_dir, data, out, TrainConfig(**{**base, **kw}))


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_grpo_trains_logs_and_resumes(tiny_llama_dir, tmp_path, backend):
    if backend == "mlx":
        pytest.importorskip("mlx_lm")
    extra = {"num_threads": 1} if backend == "torch" else {}
    data = write_split(tmp_path / "d", ROWS[2:8], ROWS[:2])
    res = _run(tiny_llama_dir, data, tmp_path / "run", backend=backend, beta=0.04, num_iterations=2, top_p=0.9, **extra)
    rows = _rows(tmp_path / "run")
    assert res.steps == 3 and len(rows) == 3 and res.backend == backend
    for r in rows:
        for k in ("reward", "reward_std", "reward_number", "reward_length", "kl", "clip_fraction", "completion_length",
                  "groups_all_equal", "val_reward", "val_reward_number", "val_completion_length"):
            assert k in r and np.isfinite(r[k]), (k, r)
        assert 1 <= r["completion_length"] <= 8 and -0.1 <= r["reward"] <= 1.0
    assert rows[1]["reward"] == rows[0]["reward"]  # num_iterations 2: step 2 reuses step 1's completions
    assert res.extra["monitor"] == "val_reward"
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    run = json.loads((tmp_path / "run" / "run.json").read_text())["resolved"]
    assert run["objective"] == "grpo"
    # an interrupted run resumes: stop after step 2 of 3, go on with --resume
    from edgetune.train.common import TrainingInterrupted

    def stop_at_2(step, row):
        if step == 2:
            raise TrainingInterrupted("stop")

    from edgetune.train import train

    cfg = TrainConfig(objective="grpo", iters=3, batch_size=2, num_generations=4, max_completion_length=8,
                      learning_rate=5e-3, warmup_ratio=0.0, dropout=0.0, eval_every=1, save_every=1,
                      rewards=["number"], seed=3, backend=backend, **extra)
    with pytest.raises(TrainingInterrupted):
        train(tiny_llama_dir, data, tmp_path / "r2", cfg, on_step=stop_at_2)
    again = train(tiny_llama_dir, data, tmp_path / "r2", cfg, resume=True)
    assert again.steps == 3 and len(_rows(tmp_path / "r2")) == 3


def test_settings_take_effect(tiny_llama_dir, tmp_path):
    """Greedy sampling (temperature 0) makes every group's completions equal (nothing to learn);
    max_completion_length caps them; beta 0 runs no reference pass (no kl logged)."""
    data = write_split(tmp_path / "d", ROWS[2:6])
    _run(tiny_llama_dir, data, tmp_path / "g", backend="torch", num_threads=1, temperature=0.0, iters=1,
         max_completion_length=3, eval_every=0)
    r = _rows(tmp_path / "g")[0]
    assert r["groups_all_equal"] == 1.0 and r["reward_std"] == 0.0 and r["completion_length"] <= 3
    assert "kl" not in r and r["loss"] == 0.0  # zero advantages, no KL: a zero loss


def test_bad_input_is_refused_before_the_model_loads(tiny_llama_dir, tmp_path):
    from edgetune.train import preflight

    no_ref = write_split(tmp_path / "n", [{"messages": [{"role": "user", "content": "hi"}]}] * 3)
    with pytest.raises(EdgetuneError, match="no reference") as ei:
        preflight(tiny_llama_dir, no_ref, TrainConfig(objective="grpo", rewards=["exact"]))
    assert "train.jsonl" in ei.value.where
    with pytest.raises(EdgetuneError, match="at least one reward"):
        preflight(tiny_llama_dir, write_split(tmp_path / "d", ROWS), TrainConfig(objective="grpo"))
    with pytest.raises(EdgetuneError, match="num_generations = 1 is outside"):
        TrainConfig(objective="grpo", num_generations=1, rewards=["exact"])
    # a reward function that raises stops the run naming the function and the prompt
    (tmp_path / "myreward.py").write_text("def score(prompts, completions, references):\n    raise ValueError('boom')\n")
    with pytest.raises(EdgetuneError, match="myreward.py:score") as ei:
        _run(tiny_llama_dir, write_split(tmp_path / "e", ROWS[2:6]), tmp_path / "run", backend="torch", num_threads=1,
             rewards=[f"{tmp_path / 'myreward.py'}:score"], iters=1)
    assert "plus" in str(ei.value)  # the prompt that failed


def test_sft_then_grpo_recipe_runs_end_to_end(tiny_llama_dir, tmp_path, monkeypatch):
    """The shipped cpu-sft-grpo-small recipe shrunk to the tiny model: GRPO runs as the align stage on
    the SFT-merged model with the recipe's rewards, and eval compares base, sft and tuned without
    asking the prompts for preference pairs."""
    from click.testing import CliRunner

    from edgetune import pipeline
    from edgetune.cli import cli
    from edgetune.io import read_json
    from edgetune.runfolder import RunFolder

    monkeypatch.setenv("EDGETUNE_HOME", str(tmp_path / "home"))
    lines = pipeline.demo_data_path().read_text(encoding="utf-8").splitlines(keepends=True)[:40]
    (tmp_path / "tickets.jsonl").write_text("".join(lines), encoding="utf-8")
    tiny = {"backend": "torch", "iters": 2, "batch_size": 2, "max_seq_len": 256, "rank": 4, "alpha": 8,
            "eval_every": 0, "save_every": 2, "num_threads": 1}
    sets = [f"model={tiny_llama_dir}", f"output={tmp_path / 'runs'}", f"data.path={tmp_path / 'tickets.jsonl'}",
            f"align.data={tmp_path / 'tickets.jsonl'}", "export.verify=false", "eval.limit=2", "eval.max_tokens=4",
            "align.num_generations=2", "align.max_completion_length=6", "align.early_stopping_patience=null",
            "data.replay=0", "eval.regression=false", "eval.max_regression={}"]
    sets += [f"{sec}.{k}={v}" for sec in ("train", "align") for k, v in tiny.items()]
    r = CliRunner().invoke(cli, ["run", "cpu-sft-grpo-small", *[a for s in sets for a in ("--set", s)]],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    run = RunFolder(tmp_path / "runs" / "cpu-sft-grpo-small")
    align = run.manifest()["stages"]["align"]["summary"]
    assert align["objective"] == "grpo" and align["steps"] == 2
    rows = _rows(run.align_train_dir)
    assert {"reward", "reward_json_fields", "reward_json_valid", "clip_fraction"} <= rows[0].keys()
    report = read_json(run.eval_report("json"))
    assert [m["name"] for m in report["models"]][:3] == ["base", "sft", "tuned"] and "preference" not in report
