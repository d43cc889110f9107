"""The one training loop, shared by every backend and objective.

``run(backend, objective, ...)`` does everything that does not depend on the framework: refusing to
overwrite a run / resuming one (optimizer, scheduler, RNG, step and data position come back from
``checkpoints/last``), encoding the splits and planning epochs, the step count and warmup, the eval
cadence, early stopping, ``checkpoints/best`` and ``checkpoints/last`` (atomic folders), the
progress bar (loss, val, tok/s, ETA), metrics.jsonl, loss.png, TensorBoard/W&B, train_config.yaml,
run.json and the :class:`report.TrainResult`; training health (``health.py``: a non-finite step
stops the run, loss spikes are warned) and greedy answers while training (``samples.py``:
``--sample-every``, ``--select-by``).

A backend knows only its framework (see :class:`Backend`); the loss and the batches come from the
objective (``objectives.py``), as mlx-lm's trainer takes ``loss`` and ``iterate_batches``. So a new
objective is a new loss and batch planner, and a new backend is one class, neither a loop edit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..console import console
from ..errors import EdgetuneError
from . import batching, health, objectives, report, samples
from .common import RESUME_KEYS, StopFlag, TrainingInterrupted


@dataclass
class StepStats:
    """One optimizer step as the backend saw it."""

    loss: float  # per loss unit (completion token for SFT), over the whole step
    lr: float  # the learning rate this step used
    grad_norm: float | None = None  # before clipping
    metrics: dict[str, float] = field(default_factory=dict)  # the loss function's metrics, per unit
    # False: the loss or the gradient norm was NaN/inf and the backend applied nothing (no optimizer or
    # scheduler step, gradients dropped); the loop stops the run (health.py)
    finite: bool = True


class Backend(Protocol):
    """What the loop needs from a framework. ``torch_backend.TorchBackend`` and ``mlx_backend.MLXBackend``."""

    name: str  # torch|mlx
    device: str
    precision: str  # the compute dtype, as reported in the result
    world_size: int  # processes in data parallel (micro-batches of a step are split across them)
    rank: int  # this process; rank 0 writes files and prints
    state_file: str  # the file inside a checkpoint folder that marks it complete

    def setup(self, total_steps: int, warmup_steps: int) -> dict:
        """Load the model, add the adapter, build optimizer + LR schedule; return settings for the record."""

    def step(self, batches: list, loss_fn) -> StepStats:
        """One optimizer step over ``batches`` (this step's micro-batches, for all processes). The loss and
        the gradient norm are checked first: when either is not finite, nothing is applied (``finite`` False)."""

    def eval_loss(self, batches: list, loss_fn) -> dict[str, float]:
        """``{"loss": per-unit loss, **metrics}`` over ``batches`` with no gradient and no dropout."""

    def generate(self, prompts: list[list[int]], *, n: int, max_new_tokens: int, temperature: float, top_p: float,
                 stop_ids: list[int], pad_id: int, seed: int) -> list[list[int]]:
        """``n`` completions per prompt (token ids) from the current weights with no dropout, grouped by
        prompt; temperature 0 is greedy and leaves the training RNG alone (GRPO, samples, select_by)."""

    def save_state(self, dirpath: Path, loop_state: dict) -> None:
        """Write optimizer, scheduler and RNG state plus ``loop_state`` into a checkpoint folder."""

    def read_state(self, dirpath: Path) -> dict:
        """``loop_state`` back from a checkpoint folder (before ``setup``: no model needed)."""

    def load_state(self, dirpath: Path, loop_state: dict) -> None:
        """Restore adapter weights, optimizer, scheduler and RNG from a checkpoint folder (after ``setup``);
        the learning rate is this run's ``learning_rate`` on the restored schedule position (a resume may
        lower it, e.g. after a non-finite step)."""

    def save_adapter(self, dirpath: Path) -> None:
        """The current adapter, in the framework's native format, into ``dirpath``."""

    def export_adapter(self, out_dir: Path, src: Path | None) -> tuple[Path, dict]:
        """Write the run's final adapter(s) from checkpoint folder ``src`` (None: the current weights);
        returns the PEFT adapter folder and extra result fields."""

    def close(self) -> None:
        """End of training on every process (data parallel: wait for rank 0's files)."""


class EpochBatches:
    """Micro-batches in order across epochs; ``(epoch, index)`` is the resumable position."""

    def __init__(self, plan, examples, plan_kw: dict, epoch: int = 0, index: int = 0):
        self.plan_fn, self.examples, self.plan_kw = plan, examples, plan_kw
        self.epoch, self.index = epoch, index
        self._cached: tuple[int, list] | None = None

    def plan(self, epoch: int) -> list:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self.plan_fn(self.examples, epoch=epoch, **self.plan_kw))
        return self._cached[1]

    def take(self, n: int) -> list:
        out = []
        while len(out) < n:
            p = self.plan(self.epoch)
            if self.index >= len(p):
                self.epoch, self.index = self.epoch + 1, 0
                continue
            out.append(p[self.index])
            self.index += 1
        return out

    @property
    def progress(self) -> float:
        return self.epoch + self.index / max(1, len(self.plan(self.epoch)))


def _load_data(objective, splits: dict, model_dir: Path, cfg, chat_template):
    from ..data.template import load_tokenizer

    tok = load_tokenizer(model_dir, chat_template=chat_template)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    train_ex, dropped = objective.encode(splits["train"], tok, cfg.max_seq_len)
    if not train_ex:
        raise EdgetuneError("No training example has a completion token to learn from.", where=str(splits["train"]))
    val_ex = objective.encode(splits["valid"], tok, cfg.max_seq_len)[0] if "valid" in splits else []
    plan_kw = dict(batch_size=cfg.batch_size, max_seq_len=cfg.max_seq_len, packing=cfg.packing,
                   group_by_length=cfg.group_by_length, pad_id=pad_id, seed=cfg.seed)
    return train_ex, dropped, val_ex, plan_kw, tok


def _check_resume(backend, cfg, out_dir: Path, resume: bool) -> dict | None:
    ckpt_last = out_dir / "checkpoints" / "last"
    if resume and (ckpt_last / backend.state_file).exists():
        state = backend.read_state(ckpt_last)
        changed = [k for k in RESUME_KEYS if state["cfg"].get(k) != getattr(cfg, k)]
        if changed:
            raise EdgetuneError(
                f"Cannot resume: {', '.join(changed)} differ from the checkpointed run.",
                where=str(ckpt_last),
                fix="resume with the same settings, or start a new run in another output folder",
            )
        return state
    if resume and backend.rank == 0:
        console.print(f"[yellow]--resume: no checkpoint in {ckpt_last}; starting from step 0[/]")
    elif not resume and ckpt_last.exists():
        raise EdgetuneError(
            f"{out_dir} already holds a training run (checkpoints/last).",
            where=str(out_dir),
            fix="add --resume to continue it, or choose another output folder",
        )
    return None


def train_with(backend_cls, model_dir, data_dir, out_dir, cfg, choice, *, resume: bool = False, on_step=None,
               chat_template=None):
    """Build ``backend_cls`` (a :class:`Backend` with a ``name``) for ``cfg`` and train it on
    ``cfg.objective`` through :func:`run`; what each backend module's ``run`` is."""
    from ..arch import arch_of_model_dir
    from . import objectives, support

    cfg = support.resolve(cfg, backend_cls.name)
    resolved = Path(model_dir).resolve()
    targets = list(cfg.target_modules or arch_of_model_dir(resolved).lora_targets)
    backend = backend_cls(resolved, cfg, choice, targets)
    return run(backend, objectives.get(cfg.objective), model_dir, data_dir, out_dir, cfg, targets=targets,
               resume=resume, on_step=on_step, chat_template=chat_template)


def run(backend, objective, model_dir, data_dir, out_dir, cfg, *, targets, resume=False, on_step=None,
        chat_template=None) -> report.TrainResult:
    """Train ``backend``'s model on ``objective``; ``cfg`` has its backend defaults resolved (support.py)."""
    t_start = time.perf_counter()
    model_dir, data_dir, out_dir = Path(model_dir).resolve(), Path(data_dir), Path(out_dir)
    main = backend.rank == 0
    splits = batching.check_data_dir(data_dir)
    state = _check_resume(backend, cfg, out_dir, resume)
    loss_fn = objective.loss_for(backend.name, cfg)

    # --- data ---------------------------------------------------------------------------------
    train_ex, dropped, val_ex, plan_kw, tok = _load_data(objective, splits, model_dir, cfg, chat_template)
    data = EpochBatches(objective.plan, train_ex, plan_kw)
    per_step = cfg.grad_accum * backend.world_size
    n_epoch0 = len(data.plan(0))
    if n_epoch0 < per_step:
        raise EdgetuneError(
            f"Only {n_epoch0} batch(es) per epoch but a step needs {per_step} (grad_accum x processes).",
            fix="lower grad_accum / batch_size or add data",
        )
    total = cfg.iters if cfg.iters else max(1, math.ceil(cfg.epochs * n_epoch0 / per_step))
    warmup = int(round(cfg.warmup_ratio * total))
    val_batches = objective.plan(val_ex, epoch=0, shuffle=False, **plan_kw) if val_ex else []
    pad_frac = batching.padding_fraction(data.plan(0))
    # greedy answers while training (samples.py): --sample-every, --select-by
    answers = samples.Answers(backend, tok, model_dir, cfg.max_seq_len) if cfg.sample_every or cfg.select_by else None
    sampler = samples.Sampler(answers, splits, cfg, out_dir, state["step"] if state else None, main) \
        if cfg.sample_every else None
    selector = samples.Selector(answers, splits, cfg) if cfg.select_by else None
    faults = health.test_faults()

    # --- model --------------------------------------------------------------------------------
    reporter = report.Reporter(cfg.report_to, out_dir, cfg, main)  # a missing package fails before loading
    try:
        info = backend.setup(total, warmup)
    except BaseException:
        reporter.close()
        raise
    # objectives that generate (GRPO) sample this step's batches from the policy and validate by reward
    session = objective.start(backend, tok, cfg, model_dir) if objective.start else None

    # --- state --------------------------------------------------------------------------------
    step, tokens_seen, elapsed = 0, 0, 0.0
    rows: list[dict] = []
    losses: list[float] = []
    best_val, best_step, bad_evals = None, None, 0
    ckpt_last = out_dir / "checkpoints" / "last"
    if state is not None:
        backend.load_state(ckpt_last, state)
        step, data.epoch, data.index = state["step"], state["epoch"], state["index"]
        tokens_seen, elapsed, rows, losses = state["tokens_seen"], state["elapsed"], state["rows"], state["losses"]
        best_val, best_step, bad_evals = state["best_val"], state["best_step"], state["bad_evals"]
        if main:
            console.print(f"resumed from step {step} (epoch {data.epoch}, batch {data.index})")
        old_lr = state.get("learning_rate")
        if main and old_lr is not None and old_lr != cfg.learning_rate:
            console.print(f"learning_rate {old_lr:g} -> {cfg.learning_rate:g}: the schedule continues from step "
                          f"{step} with the new peak")
        if state.get("select_by") != cfg.select_by and best_step is not None:
            # best_val is in another unit now: the selection starts again at the next evaluation
            best_val, best_step, bad_evals = None, None, 0
            if main:
                console.print(f"select_by {state.get('select_by') or 'validation loss'} -> "
                              f"{cfg.select_by or 'validation loss'}: the best checkpoint is chosen afresh")

    def save_checkpoint(which: str) -> None:
        if not main:
            return
        from ..io import atomic_dir

        with atomic_dir(out_dir / "checkpoints" / which) as tmp:
            backend.save_adapter(tmp)
            backend.save_state(tmp, {
                "cfg": {k: getattr(cfg, k) for k in RESUME_KEYS}, "step": step, "epoch": data.epoch,
                "index": data.index, "tokens_seen": tokens_seen, "elapsed": elapsed + (time.perf_counter() - t_loop),
                "rows": rows, "losses": losses, "best_val": best_val, "best_step": best_step, "bad_evals": bad_evals,
                "learning_rate": cfg.learning_rate, "select_by": cfg.select_by,
            })

    monitor, sign = objective.monitor, (-1.0 if objective.maximize else 1.0)
    if selector is not None:  # a task metric of greedy answers picks the best checkpoint instead
        monitor, sign = selector.metric, -float(selector.direction)

    def note(what: str):
        """A progress callback for answers being generated: shown in the bar's description."""
        def show(done: int, n: int) -> None:
            if main:
                bar.update(task, description=f"train ({backend.name}) {what} {done}/{n}")
        return show

    def evaluate(row: dict) -> float | None:
        """Validation numbers into ``row``; returns the monitored one (None: no valid split)."""
        vals = {}
        if val_batches:
            vals = session.evaluate(val_batches) if session else backend.eval_loss(val_batches, loss_fn)
            row.update({f"val_{k}": v for k, v in vals.items()})
        if selector is not None:
            vals[monitor] = row[f"val_{monitor}"] = selector.score(note(f"scoring {monitor}"))
            if main:
                bar.update(task, description=f"train ({backend.name})")
        return vals.get(monitor)

    resolved = {
        "backend": backend.name, "objective": objective.name, "device": backend.device,
        "precision": backend.precision, "target_modules": targets, "total_steps": total, "warmup_steps": warmup,
        "processes": backend.world_size, "train_examples": len(train_ex), "dropped_examples": dropped,
        "valid_examples": len(val_ex), "packing": cfg.packing, "group_by_length": cfg.group_by_length,
        "padding_fraction": round(pad_frac, 4), "batches_per_epoch": n_epoch0, "base_model": str(model_dir),
        **info,
    }
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        report.write_train_config(out_dir, cfg, resolved)
        console.print(
            f"{backend.name} {cfg.method} ({objective.name}) on {backend.device} ({backend.precision}), "
            f"{info.get('trainable_params', 0) / 1e6:.2f}M trainable params, {len(train_ex)} examples, "
            f"{total} steps, padding {pad_frac:.1%}"
        )

    from contextlib import nullcontext

    from rich.progress import TextColumn

    from ..console import progress

    stopped_early = False
    t_loop = time.perf_counter()
    bar = progress(
        TextColumn("ep {task.fields[ep]:.2f}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("val {task.fields[val]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        transient=False,
    )
    last_val = "-" if best_val is None else f"{rows[-1].get('val_' + monitor, best_val):.3f}"
    try:
        with StopFlag() as stop, (bar if main else nullcontext()):
            task = bar.add_task(f"train ({backend.name})", total=total, completed=step, ep=0.0, loss="-",
                                val=last_val, tps="-") if main else None
            while step < total:
                t0 = time.perf_counter()
                mbs, sampled = session.batches(data, per_step, step) if session else (data.take(per_step), {})
                step_loss_fn = loss_fn
                if step + 1 in faults:  # the test hook (health.py)
                    step_loss_fn = health.faulty(loss_fn, faults[step + 1], objectives.kit_for(backend.name).stop_gradient)
                st = backend.step(mbs, step_loss_fn)
                step += 1
                step_tokens = sum(b.n_tokens for b in mbs)
                dt = time.perf_counter() - t0
                ep = data.progress
                row = {"step": step, "epoch": round(ep, 4), "loss": st.loss, **sampled, **st.metrics, "lr": st.lr,
                       "tokens": tokens_seen + step_tokens, "tok_s": step_tokens / dt, "grad_norm": st.grad_norm}
                if not st.finite:  # nothing was applied: stop, leaving checkpoints/last as the last save wrote it
                    if main:
                        report.write_metrics(out_dir, rows + [{**row, "loss": None, "grad_norm": None, "nonfinite": {
                            "loss": repr(st.loss), "grad_norm": repr(st.grad_norm)}}])
                    saved = backend.read_state(ckpt_last) if (ckpt_last / backend.state_file).exists() else None
                    widths = [b.input_ids.shape[-1] for b in mbs if hasattr(b, "input_ids")]
                    raise health.nonfinite_error(step, st, cfg=cfg, precision=backend.precision,
                                                 last_loss=losses[-1] if losses else None, checkpoint=saved,
                                                 longest_row=max(widths) if widths else None,
                                                 where=str(ckpt_last if saved else out_dir))
                tokens_seen += step_tokens
                spike, baseline = health.is_spike(losses, st.loss, cfg.spike_factor) if objective.loss_spikes \
                    else (False, None)
                losses.append(st.loss)
                if spike:
                    row.update(spike=True, spike_baseline=baseline)
                    if main and not (rows and rows[-1].get("spike")):  # once per episode
                        console.print(f"[yellow]loss spike at step {step}: {st.loss:.4g} vs a recent median of "
                                      f"{baseline:.4g} (x{st.loss / baseline:.1f}); if it keeps rising, lower "
                                      f"learning_rate or check this step's data[/]")
                if cfg.eval_every and step % cfg.eval_every == 0 or step == total:
                    v = evaluate(row)
                    if v is not None:
                        last_val = f"{v:.3f}"
                        if best_val is None or sign * (v - best_val) < -1e-6:
                            best_val, best_step, bad_evals = v, step, 0
                            save_checkpoint("best")
                        else:
                            bad_evals += 1
                            if cfg.early_stopping_patience and bad_evals >= cfg.early_stopping_patience:
                                stopped_early = True
                if main and sampler is not None and sampler.due(step, last=step == total or stopped_early):  # rank 0 only: nothing depends on them
                    new = sampler.run(step, note("sampling"))
                    bar.update(task, description=f"train ({backend.name})")
                    console.print(samples.Sampler.describe(new[0]))
                rows.append(row)
                reporter.log(row)
                if main:
                    bar.update(task, completed=step, ep=ep, loss=f"{st.loss:.3f}", val=last_val,
                               tps=f"{row['tok_s']:.0f}")
                if on_step is not None:
                    on_step(step, row)
                last_step = step == total or stopped_early
                if main and (last_step or stop.requested or (cfg.save_every and step % cfg.save_every == 0)):
                    save_checkpoint("last")
                    report.write_metrics(out_dir, rows)
                if stopped_early:
                    if main:
                        console.print(f"early stopping at step {step}: val {monitor} did not improve for "
                                      f"{bad_evals} evaluations")
                    break
                if stop.requested:
                    raise TrainingInterrupted(
                        f"Training interrupted at step {step}/{total}; checkpoint saved.",
                        where=str(ckpt_last),
                        fix="continue with the same command plus --resume",
                        exit_code=130,
                    )
    finally:
        reporter.close()
    elapsed += time.perf_counter() - t_loop

    # --- outputs ------------------------------------------------------------------------------
    use_best = bool(cfg.early_stopping_patience) and best_step is not None
    adapter_dir, extra = out_dir / "adapter", {}
    if main:
        adapter_dir, extra = backend.export_adapter(out_dir, out_dir / "checkpoints" / "best" if use_best else None)
        report.write_metrics(out_dir, rows)
        report.plot_loss(out_dir, rows)
    k = max(1, min(10, len(losses) // 10))
    # best_val_loss stays a loss when the objective monitors another number (then also in extra)
    best_val_loss = next((r.get("val_loss") for r in rows if r["step"] == best_step), None)
    if monitor != "loss" and best_val is not None:
        extra = {**extra, "monitor": f"val_{monitor}", "best_monitor": best_val}
    result = report.TrainResult(
        adapter_dir=str(adapter_dir),
        final_train_loss=float(np.mean(losses[-k:])) if losses else None,
        best_val_loss=best_val_loss,
        steps=step,
        tokens_seen=tokens_seen,
        wall_s=round(time.perf_counter() - t_start, 3),
        backend=backend.name,
        device=backend.device,
        precision=backend.precision,
        stopped_early=stopped_early,
        adapter_from=f"best@{best_step}" if use_best else "last",
        padding_fraction=round(pad_frac, 4),
        peak_rss_gb=report.peak_rss_gb(),
        loss_spikes=health.spike_episodes(rows),
        extra={"train_time_s": round(elapsed, 3), "world_size": backend.world_size, **extra},
    )
    if main:
        report.write_run_json(out_dir, model_dir=model_dir, data_dir=data_dir, result=result, resolved=resolved)
    backend.close()
    return result
