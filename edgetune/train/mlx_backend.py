"""MLX backend: mlx-lm's model loading, LoRA/DoRA layers (``linear_to_lora_layers``) and quantization.

The step loop is ours rather than ``mlx_lm.tuner.trainer.train`` so that it shares everything else
with the torch backend: batches and completion masks from ``batching`` (mlx-lm's own datasets only
unmask the last assistant turn), the same LR schedule, validation + early stopping, checkpoints with
optimizer state and data position for ``--resume``, metrics.jsonl and the progress bar. mlx-lm
models take no position ids, so batches are padded (length-grouped), never packed.

QLoRA here = LoRA on a base quantized in memory with ``mlx_lm.utils.quantize_model`` (4-bit, group
64: ``mlx_lm.convert -q`` defaults). Outputs: ``adapter_mlx/`` (native: adapters.safetensors +
adapter_config.json that ``mlx_lm.generate --adapter-path`` reads) and ``adapter/`` (PEFT, exact
conversion in ``convert.py``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from ..console import console
from ..errors import EdgetuneError
from . import batching, report
from .batching import lr_lambda
from .common import RESUME_KEYS, StopFlag, TrainingInterrupted
from .convert import mlx_to_peft

QUANT = {"group_size": 64, "bits": 4}


def lora_keys(model, targets: list[str]) -> set[str]:
    """Module paths inside a transformer block whose last name is a target (e.g. self_attn.q_proj)."""
    import mlx.nn as nn

    keys = set()
    for path, m in model.layers[0].named_modules():
        if path and path.rsplit(".", 1)[-1] in targets and isinstance(m, (nn.Linear, nn.QuantizedLinear)):
            keys.add(path)
    return keys


def build_model(model_dir: Path, cfg, targets: list[str]):
    """Load with mlx-lm, quantize for qlora, freeze, add LoRA/DoRA layers; returns (model, native_cfg)."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model, quantize_model

    model, config = load_model(model_dir)
    quant = None
    if cfg.method == "qlora":
        model, config = quantize_model(model, config, QUANT["group_size"], QUANT["bits"])
        quant = dict(QUANT)
    model.freeze()
    keys = lora_keys(model, targets)
    if not keys:
        raise EdgetuneError(f"None of the target modules {targets} is a linear layer of this model.",
                            fix="set train.target_modules to the model's linear layer names")
    mx.random.seed(cfg.seed)
    lora_params = {"rank": cfg.rank, "scale": cfg.alpha / cfg.rank, "dropout": cfg.dropout, "keys": sorted(keys)}
    linear_to_lora_layers(model, len(model.layers), lora_params, use_dora=cfg.method == "dora")
    native = {
        "fine_tune_type": "dora" if cfg.method == "dora" else "lora",
        "num_layers": len(model.layers),
        "lora_parameters": lora_params,
        "model": str(model_dir),
        "base_quantization": quant,
    }
    return model, native


def _save_native(dirpath: Path, model, native: dict) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    mx.save_safetensors(str(dirpath / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (dirpath / "adapter_config.json").write_text(json.dumps(native, indent=2) + "\n")


def run(model_dir, data_dir, out_dir, cfg, choice, *, resume: bool = False, on_step=None, chat_template=None):
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_map, tree_unflatten

    from ..arch import arch_of_model_dir
    from ..data.template import load_tokenizer
    from ..io import atomic_dir

    t_start = time.perf_counter()
    model_dir, data_dir, out_dir = Path(model_dir).resolve(), Path(data_dir), Path(out_dir)
    arch = arch_of_model_dir(model_dir)
    splits = batching.check_data_dir(data_dir)
    targets = list(cfg.target_modules or arch.lora_targets)
    ckpt_last = out_dir / "checkpoints" / "last"
    state = None
    if resume and (ckpt_last / "state.json").exists():
        state = json.loads((ckpt_last / "state.json").read_text())
        changed = [k for k in RESUME_KEYS if state["cfg"].get(k) != getattr(cfg, k)]
        if changed:
            raise EdgetuneError(f"Cannot resume: {', '.join(changed)} differ from the checkpointed run.",
                                where=str(ckpt_last), fix="resume with the same settings")
    elif not resume and ckpt_last.exists():
        raise EdgetuneError(f"{out_dir} already holds a training run (checkpoints/last).", where=str(out_dir),
                            fix="add --resume to continue it, or choose another output folder")

    tok = load_tokenizer(model_dir, chat_template=chat_template)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    train_ex, dropped = batching.encode_split(splits["train"], tok, cfg.max_seq_len)
    if not train_ex:
        raise EdgetuneError("No training example has a completion token to learn from.", where=str(splits["train"]))
    val_ex = batching.encode_split(splits["valid"], tok, cfg.max_seq_len)[0] if "valid" in splits else []
    plan_kw = dict(batch_size=cfg.batch_size, max_seq_len=cfg.max_seq_len, packing=False, group_by_length=True,
                   pad_id=pad_id, seed=cfg.seed)
    plans: dict[int, list] = {}

    def plan(epoch: int):
        if epoch not in plans:
            plans.clear()
            plans[epoch] = batching.plan_epoch(train_ex, epoch=epoch, **plan_kw)
        return plans[epoch]

    n_epoch0 = len(plan(0))
    if n_epoch0 < cfg.grad_accum:
        raise EdgetuneError(f"Only {n_epoch0} batch(es) per epoch but a step needs {cfg.grad_accum}.",
                            fix="lower grad_accum / batch_size or add data")
    total = cfg.iters if cfg.iters else max(1, math.ceil(cfg.epochs * n_epoch0 / cfg.grad_accum))
    warmup = int(round(cfg.warmup_ratio * total))
    val_batches = batching.plan_epoch(val_ex, epoch=0, shuffle=False, **plan_kw) if val_ex else []
    pad_frac = batching.padding_fraction(plan(0))

    model, native = build_model(model_dir, cfg, targets)
    n_trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    factor = lr_lambda(total, warmup, cfg.lr_scheduler)
    opt = optim.AdamW(learning_rate=cfg.learning_rate * factor(0), weight_decay=cfg.weight_decay)

    def loss_sum(model, inputs, labels):
        logits = model(inputs).astype(mx.float32)
        mask = labels != batching.IGNORE
        ce = nn.losses.cross_entropy(logits, mx.where(mask, labels, 0), reduction="none")
        return (ce * mask).sum()

    def scaled_loss(model, inputs, labels, norm):
        return loss_sum(model, inputs, labels) / norm

    value_and_grad = nn.value_and_grad(model, scaled_loss)

    step, epoch, index, tokens_seen, elapsed = 0, 0, 0, 0, 0.0
    rows: list[dict] = []
    losses: list[float] = []
    best_val, best_step, bad_evals = None, None, 0
    if state is not None:
        model.load_weights(list(mx.load(str(ckpt_last / "adapters.safetensors")).items()), strict=False)
        opt.init(model.trainable_parameters())
        opt.state = tree_unflatten(list(mx.load(str(ckpt_last / "optimizer.safetensors")).items()))
        step, epoch, index = state["step"], state["epoch"], state["index"]
        tokens_seen, elapsed, rows, losses = state["tokens_seen"], state["elapsed"], state["rows"], state["losses"]
        best_val, best_step, bad_evals = state["best_val"], state["best_step"], state["bad_evals"]
        console.print(f"resumed from step {step} (epoch {epoch}, batch {index})")

    def save_checkpoint(which: str) -> None:
        with atomic_dir(out_dir / "checkpoints" / which) as tmp:
            _save_native(tmp, model, native)
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(opt.state)))
            st = {"cfg": {k: getattr(cfg, k) for k in RESUME_KEYS}, "step": step, "epoch": epoch, "index": index,
                  "tokens_seen": tokens_seen, "elapsed": elapsed + (time.perf_counter() - t_loop), "rows": rows,
                  "losses": losses, "best_val": best_val, "best_step": best_step, "bad_evals": bad_evals}
            (tmp / "state.json").write_text(json.dumps(st))

    def evaluate():
        if not val_batches:
            return None
        model.eval()
        tot = n = 0.0
        for b in val_batches:
            tot += loss_sum(model, mx.array(b.input_ids), mx.array(b.labels)).item()
            n += b.n_target
        model.train()
        return tot / max(n, 1)

    def next_micro_batches(n: int):
        nonlocal epoch, index
        out = []
        while len(out) < n:
            p = plan(epoch)
            if index >= len(p):
                epoch, index = epoch + 1, 0
                continue
            out.append(p[index])
            index += 1
        return out

    resolved = {"backend": "mlx", "device": choice.device, "precision": "model dtype (LoRA fp32)",
                "target_modules": targets, "mlx_keys": native["lora_parameters"]["keys"], "total_steps": total,
                "warmup_steps": warmup, "trainable_params": int(n_trainable), "train_examples": len(train_ex),
                "dropped_examples": dropped, "valid_examples": len(val_ex), "padding_fraction": round(pad_frac, 4),
                "packing": False, "base_quantization": native["base_quantization"], "base_model": str(model_dir)}
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_train_config(out_dir, cfg, resolved)
    console.print(f"mlx {cfg.method} on {choice.device}, {n_trainable / 1e6:.2f}M trainable params, "
                  f"{len(train_ex)} examples, {total} steps, padding {pad_frac:.1%}")

    from rich.progress import TextColumn

    from ..console import progress

    model.train()
    stopped_early = False
    t_loop = time.perf_counter()
    bar = progress(TextColumn("ep {task.fields[ep]:.2f}"), TextColumn("loss {task.fields[loss]}"),
                   TextColumn("val {task.fields[val]}"), TextColumn("{task.fields[tps]} tok/s"))
    last_val = "-"
    with StopFlag() as stop, bar:
        task = bar.add_task("train (mlx)", total=total, completed=step, ep=0.0, loss="-", val=last_val, tps="-")
        while step < total:
            t0 = time.perf_counter()
            # mlx's RNG state cannot be restored, so dropout noise is re-seeded from (seed, step):
            # a resumed run draws exactly what the uninterrupted one drew
            mx.random.seed(cfg.seed * 1_000_003 + step)
            mbs = next_micro_batches(cfg.grad_accum)
            n_tgt = max(1, sum(b.n_target for b in mbs))
            grads, step_loss = None, 0.0
            for b in mbs:
                lv, g = value_and_grad(model, mx.array(b.input_ids), mx.array(b.labels), mx.array(float(n_tgt)))
                grads = g if grads is None else tree_map(lambda x, y: x + y, grads, g)
                mx.eval(lv, grads)
                step_loss += lv.item()
            gnorm = None
            if cfg.max_grad_norm:
                grads, gnorm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
            lr = cfg.learning_rate * factor(step)
            opt.learning_rate = lr
            opt.update(model, grads)
            mx.eval(model.trainable_parameters(), opt.state)
            step += 1
            step_tokens = sum(b.n_tokens for b in mbs)
            tokens_seen += step_tokens
            losses.append(step_loss)
            dt = time.perf_counter() - t0
            ep = epoch + index / max(1, len(plan(epoch)))
            row = {"step": step, "epoch": round(ep, 4), "loss": step_loss, "lr": lr, "tokens": tokens_seen,
                   "tok_s": step_tokens / dt, "grad_norm": float(gnorm.item()) if gnorm is not None else None}
            if cfg.eval_every and step % cfg.eval_every == 0 or step == total:
                v = evaluate()
                if v is not None:
                    row["val_loss"] = v
                    last_val = f"{v:.3f}"
                    if best_val is None or v < best_val - 1e-6:
                        best_val, best_step, bad_evals = v, step, 0
                        save_checkpoint("best")
                    else:
                        bad_evals += 1
                        if cfg.early_stopping_patience and bad_evals >= cfg.early_stopping_patience:
                            stopped_early = True
            rows.append(row)
            bar.update(task, completed=step, ep=ep, loss=f"{step_loss:.3f}", val=last_val, tps=f"{row['tok_s']:.0f}")
            if on_step is not None:
                on_step(step, row)
            last_step = step == total or stopped_early
            if last_step or stop.requested or (cfg.save_every and step % cfg.save_every == 0):
                save_checkpoint("last")
                report.write_metrics(out_dir, rows)
            if stopped_early:
                console.print(f"early stopping at step {step}: val loss did not improve for {bad_evals} evaluations")
                break
            if stop.requested:
                raise TrainingInterrupted(f"Training interrupted at step {step}/{total}; checkpoint saved.",
                                          where=str(ckpt_last), fix="continue with the same command plus --resume",
                                          exit_code=130)
    elapsed += time.perf_counter() - t_loop

    use_best = bool(cfg.early_stopping_patience) and best_step is not None
    src = out_dir / "checkpoints" / ("best" if use_best else "last")
    with atomic_dir(out_dir / "adapter_mlx") as tmp:
        for name in ("adapters.safetensors", "adapter_config.json"):
            (tmp / name).write_bytes((src / name).read_bytes())
    mlx_to_peft(out_dir / "adapter_mlx", out_dir / "adapter", model_dir, num_model_layers=len(model.layers))
    report.write_metrics(out_dir, rows)
    report.plot_loss(out_dir, rows)
    k = max(1, min(10, len(losses) // 10))
    result = report.TrainResult(
        adapter_dir=str(out_dir / "adapter"),
        final_train_loss=float(np.mean(losses[-k:])) if losses else None,
        best_val_loss=best_val, steps=step, tokens_seen=tokens_seen,
        wall_s=round(time.perf_counter() - t_start, 3), backend="mlx", device=choice.device,
        precision="mlx", stopped_early=stopped_early, adapter_from=f"best@{best_step}" if use_best else "last",
        padding_fraction=round(pad_frac, 4), peak_rss_gb=report.peak_rss_gb(),
        extra={"train_time_s": round(elapsed, 3), "adapter_mlx": str(out_dir / "adapter_mlx"),
               "mlx_peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3)},
    )
    report.write_run_json(out_dir, model_dir=model_dir, data_dir=data_dir, result=result, resolved=resolved)
    return result

