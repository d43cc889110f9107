"""Training health on the tiny model: a non-finite step stops the run with the last good checkpoint
intact, loss spikes are warned, greedy samples while training, a task metric picks the best checkpoint.

Non-finite steps and spikes are forced with ``EDGETUNE_TEST_LOSS`` (train/health.py): the tiny random
model does not reliably overflow with an absurd learning rate (its logits collapse to uniform).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from edgetune.config import TrainConfig  # noqa: E402
from edgetune.errors import EdgetuneError  # noqa: E402
from edgetune.train import health, loop, samples, train  # noqa: E402
from edgetune.train.torch_backend import TorchBackend  # noqa: E402

ENV = health.TEST_ENV


def chat(q, a, **extra):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra}


TRAIN = [chat(f"Question {i}?", f"Answer {i} " * 4) for i in range(8)]


def write_data(d: Path, train_rows=TRAIN, valid_rows=None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    if valid_rows is not None:
        (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in valid_rows))
    return d


def cfg(**kw) -> TrainConfig:
    base = dict(backend="torch", iters=8, batch_size=2, max_seq_len=64, learning_rate=1e-2, eval_every=0,
                save_every=2, precision="fp32", num_threads=1, warmup_ratio=0.0, lr_scheduler="constant")
    base.update(kw)
    return TrainConfig(**base)


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def spy_backend(monkeypatch):
    """The backend object the loop trained with (``seen["backend"]``)."""
    seen = {}
    real = loop.run

    def spy(backend, *a, **k):
        seen["backend"] = backend
        return real(backend, *a, **k)

    monkeypatch.setattr(loop, "run", spy)
    return seen


@pytest.fixture
def spy_generate(monkeypatch):
    """Every TorchBackend.generate call: (prompt ids, max_new_tokens)."""
    calls = []
    real = TorchBackend.generate

    def gen(self, prompts, **kw):
        calls.append((prompts, kw["max_new_tokens"]))
        return real(self, prompts, **kw)

    monkeypatch.setattr(TorchBackend, "generate", gen)
    return calls


# --- non-finite steps -----------------------------------------------------------------------------


def test_nonfinite_loss_stops_keeps_the_last_checkpoint_and_resumes_with_a_lower_lr(
        tiny_llama_dir, tmp_path, monkeypatch, spy_backend):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    data, out = write_data(tmp_path / "d"), tmp_path / "run"
    monkeypatch.setenv(ENV, "5:nan")
    with pytest.raises(health.NonFiniteStep) as exc:
        train(tiny_llama_dir, data, out, cfg())
    err = exc.value
    assert "step 5" in err.message and "loss is nan" in err.message and "learning_rate 0.01" in err.message
    assert "checkpoints/last (step 4)" in err.fix and "--resume --lr 0.0033" in err.fix
    assert err.where == str(out / "checkpoints" / "last")
    # the failing step was not applied: the weights and the optimizer are those saved at step 4
    be = spy_backend["backend"]
    saved = load_file(str(out / "checkpoints" / "last" / "adapter_model.safetensors"))
    from peft import get_peft_model_state_dict

    live = get_peft_model_state_dict(be.model)
    assert saved.keys() == live.keys()
    for k in saved:
        assert torch.equal(saved[k], live[k]), k
    assert {int(s["step"]) for s in be.opt.state.values()} == {4} and be.sched.last_epoch == 4
    state = torch.load(out / "checkpoints" / "last" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 4 and all(math.isfinite(x) for x in state["losses"])
    assert not (out / "adapter").exists()
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["nonfinite"]["loss"] == "nan"
    # the last good checkpoint loads with plain PEFT and gives finite logits
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                                      out / "checkpoints" / "last")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()

    # resume with a lower learning rate: it continues from step 4 and uses the new rate
    monkeypatch.delenv(ENV)
    seen = []
    res = train(tiny_llama_dir, data, out, cfg(learning_rate=2e-3), resume=True, on_step=lambda s, r: seen.append(s))
    assert seen == [5, 6, 7, 8] and res.steps == 8
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9)) and "nonfinite" not in rows[4]
    assert [r["lr"] for r in rows] == [1e-2] * 4 + [2e-3] * 4


def test_nonfinite_gradient_stops_before_the_first_save(tiny_llama_dir, tmp_path, monkeypatch):
    data, out = write_data(tmp_path / "d"), tmp_path / "run"
    monkeypatch.setenv(ENV, "2:grad")  # the loss stays finite, its gradient does not
    with pytest.raises(health.NonFiniteStep) as exc:  # max_grad_norm 0: the norm comes without clipping
        train(tiny_llama_dir, data, out, cfg(max_grad_norm=0.0, save_every=4))
    assert "gradient norm is" in exc.value.message and "loss is" not in exc.value.message
    assert "no checkpoint was saved yet (save_every 4)" in exc.value.fix
    assert not (out / "checkpoints" / "last").exists()
    assert all(r["grad_norm"] is not None for r in metrics(out)[:-1])  # the norm is logged without clipping too
    monkeypatch.setenv(ENV, "2:x")
    with pytest.raises(EdgetuneError, match="STEP:FACTOR"):
        health.test_faults()


@pytest.mark.mlx
def test_mlx_nonfinite_step_is_not_applied_and_samples(tiny_llama_dir, tmp_path, monkeypatch, spy_backend):
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    data = write_data(tmp_path / "d", TRAIN[:4], [chat("Capital of France?", "Paris.")])
    out = tmp_path / "run"
    monkeypatch.setenv(ENV, "3:inf")
    c = cfg(backend="mlx", iters=4, num_threads=None, sample_every=2, sample_prompts=1, sample_max_tokens=4)
    with pytest.raises(health.NonFiniteStep, match="step 3: the loss is inf"):
        train(tiny_llama_dir, data, out, c)
    be = spy_backend["backend"]
    assert be.steps_done == 2
    saved = mx.load(str(out / "checkpoints" / "last" / "adapters.safetensors"))
    live = dict(tree_flatten(be.model.trainable_parameters()))
    assert saved.keys() == live.keys()
    for k in saved:
        np.testing.assert_array_equal(np.array(saved[k]), np.array(live[k]))
    assert json.loads((out / "checkpoints" / "last" / "state.json").read_text())["step"] == 2
    got = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompt"], s["reference"]) for s in got] == [(2, "Capital of France?", "Paris.")]


# --- loss spikes ----------------------------------------------------------------------------------


def test_spike_rule():
    flat = [2.0] * 10
    assert health.is_spike(flat[:4], 100.0, 2.0) == (False, None)  # too little history
    assert health.is_spike(flat, 4.1, 2.0) == (True, 2.0)
    assert health.is_spike(flat, 3.9, 2.0)[0] is False
    assert health.is_spike(flat, 100.0, 0.0)[0] is False  # off
    low = [0.1] * 10
    assert health.is_spike(low, 0.5, 2.0)[0] is False and health.is_spike(low, 0.7, 2.0)[0] is True  # 0.5 rise
    assert health.is_spike([5.0] * 15 + [1.0] * 20, 2.1, 2.0)[0] is True  # the last 20 steps only
    assert health.spike_episodes([{}, {"spike": True}, {"spike": True}, {}, {"spike": True}]) == 2


def test_loss_spike_is_warned_once_per_episode(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    data, out = write_data(tmp_path / "d"), tmp_path / "run"
    monkeypatch.setenv(ENV, "7:6,10:6,11:6")  # three spike steps, two episodes
    res = train(tiny_llama_dir, data, out, cfg(iters=12, save_every=100, spike_factor=3.0))
    rows = metrics(out)
    assert [r["step"] for r in rows if r.get("spike")] == [7, 10, 11]
    r7 = rows[6]
    assert r7["loss"] > 3 * r7["spike_baseline"] and r7["spike_baseline"] < 11
    warned = capsys.readouterr().err
    assert warned.count("loss spike at step") == 2 and "step 7" in warned and "step 10" in warned
    assert res.loss_spikes == 2
    assert json.loads((out / "run.json").read_text())["result"]["loss_spikes"] == 2


# --- samples --------------------------------------------------------------------------------------


def test_samples_every_n_steps_from_the_valid_prompts_and_resume(tiny_llama_dir, tmp_path, monkeypatch, spy_generate):
    from edgetune.data.template import load_tokenizer, render_prompt

    valid = [{"text": "a text row has no prompt"},
             chat("Think off: what is 2+2?", "4", enable_thinking=False),
             {"prompt": "Say hi.", "completion": "hi"},
             chat("Never sampled?", "No.")]
    data, out = write_data(tmp_path / "d", TRAIN, valid), tmp_path / "run"
    c = cfg(iters=8, save_every=4, sample_every=3, sample_prompts=2, sample_max_tokens=5)
    monkeypatch.setenv(ENV, "7:nan")  # stops after the step-6 samples; checkpoints/last holds step 4
    with pytest.raises(health.NonFiniteStep):
        train(tiny_llama_dir, data, out, c, chat_template="qwen3")
    got = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in got] == [3, 3, 6, 6]
    # the prompts are the valid rows rendered as training renders them, enable_thinking included
    tok = load_tokenizer(tiny_llama_dir, chat_template="qwen3")
    sent = [tok.decode(p) for p in spy_generate[0][0]]
    assert sent == [render_prompt(tok, [{"role": "user", "content": "Think off: what is 2+2?"}], thinking=False),
                    render_prompt(tok, [{"role": "user", "content": "Say hi."}])]
    assert sent[0].endswith("<think>\n\n</think>\n\n") and not sent[1].endswith("</think>\n\n")
    assert all(n == 5 for _, n in spy_generate)

    monkeypatch.delenv(ENV)
    train(tiny_llama_dir, data, out, c, resume=True, chat_template="qwen3")
    got = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in got] == [3, 3, 6, 6, 8, 8]  # step 6 sampled again after resuming at 4, not twice
    assert [(s["row"], s["prompt"], s["reference"]) for s in got[:2]] == [
        (2, "Think off: what is 2+2?", "4"), (3, "Say hi.", "hi")]
    assert all(isinstance(s["output"], str) for s in got)


class FakeBackend:
    """``generate`` answers each prompt with the text ``reply(prompt_text)`` + end of turn."""

    def __init__(self, tok, reply):
        self.tok, self.reply = tok, reply

    def generate(self, prompts, *, n, max_new_tokens, temperature, top_p, stop_ids, pad_id, seed):
        assert temperature == 0.0 and n == 1
        return [self.tok(self.reply(self.tok.decode(p)), add_special_tokens=False)["input_ids"] + [stop_ids[0]]
                for p in prompts]


def test_answers_are_scored_like_eval(tiny_llama_dir, tmp_path):
    """Without a valid split the samples come from train; select_by scores the final answer (a
    thinking template's reasoning split off) with eval's metrics, over select_by_limit rows."""
    from edgetune.data.template import load_tokenizer

    tok = load_tokenizer(tiny_llama_dir, chat_template="qwen3")
    refs = ['{"team": "billing", "urgent": true}', '{"team": "tech", "urgent": false}', '{"team": "x", "urgent": true}']
    data = write_data(tmp_path / "d", [chat(f"Ticket {i}", r) for i, r in enumerate(refs)])

    def reply(prompt):  # right answer for tickets 0 and 1 (after some reasoning), wrong team for 2
        i = int(prompt.split("Ticket ")[1][0])
        return "<think>\nhmm\n</think>\n\n" + (refs[i] if i < 2 else '{"team": "y", "urgent": true}')

    answers = samples.Answers(FakeBackend(tok, reply), tok, tiny_llama_dir, 256)
    splits = {"train": data / "train.jsonl"}
    s = samples.Sampler(answers, splits, cfg(sample_every=1, sample_prompts=2), tmp_path / "o", None, True)
    assert s.split == "train" and [e.row.row for e in s.items] == [1, 2]
    splits["valid"] = splits["train"]
    for metric, want in (("exact_match", 2 / 3), ("json_fields", 5 / 6), ("json_valid", 1.0), ("json_schema", 1.0)):
        sel = samples.Selector(answers, splits, cfg(select_by=metric, eval_every=1, early_stopping_patience=1))
        assert sel.score() == pytest.approx(want), metric
    sel = samples.Selector(answers, splits, cfg(select_by="exact_match", eval_every=1, early_stopping_patience=1,
                                                select_by_limit=2))
    assert len(sel.items) == 2 and sel.score() == 1.0
    assert sel.max_new_tokens == max(len(tok(r)["input_ids"]) for r in refs[:2]) + samples.SELECT_SLACK


# --- select_by ------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction,best", [(1, 4), (-1, 2)])
def test_select_by_follows_the_metric_not_the_val_loss(tiny_llama_dir, tmp_path, monkeypatch, spy_generate,
                                                        direction, best):
    """Scripted metric values per evaluation (0.2, 0.9, 0.5) on top of real greedy generation: the best
    checkpoint is the metric's (step 4 when higher is better, step 2 when lower is), not the val loss's."""
    from edgetune.eval import metrics as M

    monkeypatch.setitem(M.DIRECTION, "exact_match", direction)
    script = iter([0.2, 0.9, 0.5])
    real_score = samples.Selector.score

    def scripted(self, note=None):
        assert real_score(self, note) == 0.0  # the random model's answers are wrong
        return next(script)

    monkeypatch.setattr(samples.Selector, "score", scripted)
    data, out = write_data(tmp_path / "d", TRAIN, TRAIN[:3]), tmp_path / "run"  # val loss falls with the train loss
    c = cfg(iters=6, eval_every=2, early_stopping_patience=3, select_by="exact_match", select_by_limit=2)
    res = train(tiny_llama_dir, data, out, c)
    rows = metrics(out)
    evals = [(r["step"], r["val_exact_match"], r["val_loss"]) for r in rows if "val_exact_match" in r]
    assert [(s, m) for s, m, _ in evals] == [(2, 0.2), (4, 0.9), (6, 0.5)]
    assert evals[2][2] < evals[1][2] < evals[0][2]  # the val loss alone would have picked step 6
    assert res.adapter_from == f"best@{best}" and res.extra["monitor"] == "val_exact_match"
    assert res.extra["best_monitor"] == {2: 0.2, 4: 0.9}[best]
    assert res.best_val_loss == {s: v for s, _, v in evals}[best]
    name = "adapter_model.safetensors"
    assert (out / "adapter" / name).read_bytes() == (out / "checkpoints" / "best" / name).read_bytes()
    assert torch.load(out / "checkpoints" / "best" / "trainer_state.pt", weights_only=False)["step"] == best
    assert [len(p) for p, _ in spy_generate] == [2, 2, 2]  # select_by_limit rows per evaluation


def test_misconfiguration_is_refused_with_a_fix(tiny_llama_dir, tmp_path):
    from click.testing import CliRunner

    from edgetune.cli import cli
    from edgetune.config import config_from_dict

    with pytest.raises(EdgetuneError, match="eval_every = 0") as e:
        cfg(select_by="json_fields", eval_every=0, early_stopping_patience=2)
    assert "--eval-every" in e.value.fix
    with pytest.raises(EdgetuneError, match="only with early stopping") as e:
        cfg(select_by="json_fields", eval_every=5)
    assert "--early-stopping" in e.value.fix
    with pytest.raises(EdgetuneError, match="train.select_by = 'bleu' is not one of"):
        cfg(select_by="bleu", eval_every=5, early_stopping_patience=2)
    for bad in (dict(spike_factor=0.5), dict(spike_factor=-1), dict(sample_every=-1), dict(sample_prompts=0),
                dict(sample_max_tokens=0), dict(select_by_limit=0)):
        with pytest.raises(EdgetuneError):
            cfg(**bad)
    ok = dict(select_by="json_fields", eval_every=5, early_stopping_patience=2)
    # data problems: before any model loads
    no_valid = write_data(tmp_path / "nv")
    with pytest.raises(EdgetuneError, match="no valid.jsonl") as e:
        train(tiny_llama_dir, no_valid, tmp_path / "o1", cfg(**ok))
    assert "--valid-ratio" in e.value.fix and not (tmp_path / "o1").exists()
    text_valid = write_data(tmp_path / "tv", TRAIN, [{"text": "no prompt here"}])
    with pytest.raises(EdgetuneError, match="no row of the valid split has a prompt"):
        train(tiny_llama_dir, text_valid, tmp_path / "o2", cfg(**ok))
    plain = write_data(tmp_path / "pl", TRAIN, TRAIN[:2])
    with pytest.raises(EdgetuneError, match="not all JSON objects"):
        train(tiny_llama_dir, plain, tmp_path / "o3", cfg(**{**ok, "select_by": "json_schema"}))
    # the recipe's train: section and the CLI flags
    rc = config_from_dict({"train": {"spike_factor": 3, "sample_every": 10, "sample_prompts": 2, "sample_max_tokens": 32,
                                     "select_by": "exact_match", "select_by_limit": 8, "eval_every": 10,
                                     "early_stopping_patience": 2}})
    assert (rc.train.spike_factor, rc.train.sample_every, rc.train.sample_prompts, rc.train.sample_max_tokens,
            rc.train.select_by, rc.train.select_by_limit) == (3.0, 10, 2, 32, "exact_match", 8)
    base = ["train", "-m", str(tiny_llama_dir), "-d", str(plain), "-o", str(tmp_path / "o4"), "--dry-run", "-b", "2",
            "--max-seq-len", "64"]
    r = CliRunner().invoke(cli, base + ["--select-by", "exact_match", "--eval-every", "5"])
    assert r.exit_code != 0 and "--early-stopping" in r.exception.fix
    r = CliRunner().invoke(cli, base + ["--select-by", "exact_match", "--eval-every", "5", "--early-stopping", "2",
                                        "--select-by-limit", "4", "--sample-every", "3", "--sample-prompts", "1",
                                        "--sample-max-tokens", "16", "--spike-factor", "4"])
    assert r.exit_code == 0, r.output
