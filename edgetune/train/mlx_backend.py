"""MLX backend: mlx-lm's model loading, LoRA/DoRA layers (``linear_to_lora_layers``) and quantization.

The loop is ``loop.py``'s, shared with torch; this module is the MLX side of it
(:class:`MLXBackend`) rather than ``mlx_lm.tuner.trainer.train``, so that batches and completion
masks come from ``batching`` (mlx-lm's own datasets only unmask the last assistant turn) and
resume, validation, early stopping, checkpoints and reporting are the same on both backends. mlx-lm
models take no position ids, so batches are padded (length-grouped by default), never packed.

QLoRA here = LoRA on a base quantized in memory with ``mlx_lm.utils.quantize_model`` (4-bit, group
64: ``mlx_lm.convert -q`` defaults). Outputs: ``adapter_mlx/`` (native: adapters.safetensors +
adapter_config.json that ``mlx_lm.generate --adapter-path`` reads) and ``adapter/`` (PEFT, exact
conversion in ``convert.py``).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import EdgetuneError
from . import batching
from .batching import lr_lambda
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
    if cfg.precision != "auto":  # frozen base weights in the asked dtype; mlx-lm's LoRA weights stay fp32
        model.set_dtype({"bf16": mx.bfloat16, "fp16": mx.float16, "fp32": mx.float32}[cfg.precision])
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
    if cfg.gradient_checkpointing:
        checkpoint_layers(model)
    native = {
        "fine_tune_type": "dora" if cfg.method == "dora" else "lora",
        "num_layers": len(model.layers),
        "lora_parameters": lora_params,
        "model": str(model_dir),
        "base_quantization": quant,
    }
    return model, native


_CHECKPOINTED: dict = {}


def checkpoint_layers(model) -> None:
    """Recompute each transformer block's activations in backward (``mx.checkpoint``), as mlx-lm's
    ``grad_checkpoint`` does, but per model: that one replaces ``__call__`` on the block's class for
    the whole process; here each block of this model gets a subclass that checkpoints."""
    import mlx.core as mx

    for layer in model.layers:
        cls = type(layer)
        if cls not in _CHECKPOINTED:
            plain = cls.__call__

            def call(self, *args, _plain=plain, **kwargs):
                def inner(params, *a, **k):
                    self.update(params)
                    return _plain(self, *a, **k)

                return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

            _CHECKPOINTED[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": call})
        layer.__class__ = _CHECKPOINTED[cls]


def _save_native(dirpath: Path, model, native: dict) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    mx.save_safetensors(str(dirpath / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (dirpath / "adapter_config.json").write_text(json.dumps(native, indent=2) + "\n")


class MLXBackend:
    """The MLX side of :class:`edgetune.train.loop.Backend`: mlx-lm model + LoRA/DoRA, AdamW, one process."""

    name = "mlx"
    state_file = "state.json"
    world_size, rank = 1, 0

    def __init__(self, model_dir: Path, cfg, choice, targets: list[str]):
        self.model_dir, self.cfg, self.targets = Path(model_dir), cfg, targets
        self.device = choice.device
        self.precision = "mlx" if cfg.precision == "auto" else cfg.precision
        self.steps_done = 0
        self._vg: dict = {}

    def setup(self, total_steps: int, warmup_steps: int) -> dict:
        import mlx.optimizers as optim
        from mlx.utils import tree_flatten

        self.model, self.native = build_model(self.model_dir, self.cfg, self.targets)
        self.factor = lr_lambda(total_steps, warmup_steps, self.cfg.lr_scheduler)
        self.opt = optim.AdamW(learning_rate=self.cfg.learning_rate * self.factor(0), weight_decay=self.cfg.weight_decay)
        self.model.train()
        n_trainable = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
        return {"trainable_params": int(n_trainable), "mlx_keys": self.native["lora_parameters"]["keys"],
                "base_quantization": self.native["base_quantization"],
                "precision": "model dtype (LoRA fp32)" if self.cfg.precision == "auto" else self.cfg.precision}

    @staticmethod
    def _arrays(batch) -> dict:
        import mlx.core as mx

        return {k: mx.array(v) for k, v in vars(batch).items() if isinstance(v, np.ndarray)}

    def _value_and_grad(self, loss_fn):
        if loss_fn not in self._vg:
            import mlx.nn as nn

            def scaled(model, arrays, norm):
                loss, metrics = loss_fn(model, arrays)
                return loss / norm, metrics

            self._vg[loss_fn] = nn.value_and_grad(self.model, scaled)
        return self._vg[loss_fn]

    def step(self, batches, loss_fn):
        import mlx.core as mx
        import mlx.optimizers as optim
        from mlx.utils import tree_flatten, tree_map

        from .loop import StepStats

        # mlx's RNG state cannot be restored, so dropout noise is re-seeded from (seed, step):
        # a resumed run draws exactly what the uninterrupted one drew
        mx.random.seed(self.cfg.seed * 1_000_003 + self.steps_done)
        value_and_grad = self._value_and_grad(loss_fn)
        units = max(1, sum(b.n_target for b in batches))
        norm = mx.array(float(units))
        grads, step_loss, sums = None, 0.0, {}
        for b in batches:
            (lv, metrics), g = value_and_grad(self.model, self._arrays(b), norm)
            grads = g if grads is None else tree_map(lambda x, y: x + y, grads, g)
            mx.eval(lv, grads, metrics)
            step_loss += lv.item()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v.item()
        if self.cfg.max_grad_norm:
            grads, gnorm = optim.clip_grad_norm(grads, self.cfg.max_grad_norm)
        else:
            gnorm = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))
        lr = self.cfg.learning_rate * self.factor(self.steps_done)
        stats = StepStats(step_loss, lr, float(gnorm.item()), {k: v / units for k, v in sums.items()})
        if not (math.isfinite(stats.loss) and math.isfinite(stats.grad_norm)):
            stats.finite = False  # nothing applied: weights, optimizer state and the step count as they were
            return stats
        self.opt.learning_rate = lr
        self.opt.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.opt.state)
        self.steps_done += 1
        return stats

    def eval_loss(self, batches, loss_fn) -> dict:
        self.model.eval()
        tot = n = 0.0
        sums: dict = {}
        for b in batches:
            loss, metrics = loss_fn(self.model, self._arrays(b))
            tot += loss.item()
            n += b.n_target
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v.item()
        self.model.train()
        n = max(n, 1)
        return {"loss": tot / n, **{k: v / n for k, v in sums.items()}}

    def token_logps(self, batch, reference: bool = False) -> np.ndarray:
        """Per-token log-probs of ``batch``'s scored tokens (no dropout), numpy ``[rows, L]``."""
        self.model.eval()
        try:
            lp, _ = MLXKit.token_logps(self.model, self._arrays(batch), reference=reference)
        finally:
            self.model.train()
        return np.array(lp)

    def generate(self, prompts: list[list[int]], *, n: int, max_new_tokens: int, temperature: float, top_p: float,
                 stop_ids: list[int], pad_id: int, seed: int) -> list[list[int]]:
        """``n`` completions per prompt from the current policy (adapter on, no dropout), grouped by
        prompt: mlx-lm's ``generate_step`` (KV cache) per sequence. Temperature 0: greedy."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler

        mx.random.seed(seed)
        sampler = make_sampler(temp=temperature, top_p=top_p if top_p < 1.0 else 0.0)
        stop = set(stop_ids)
        outs = []
        self.model.eval()
        try:
            for p in prompts:
                for _ in range(n):
                    toks = []
                    for tok, _lp in generate_step(mx.array(p), self.model, max_tokens=max_new_tokens, sampler=sampler):
                        t = int(tok.item() if hasattr(tok, "item") else tok)
                        toks.append(t)
                        if t in stop:
                            break
                    outs.append(toks)
        finally:
            self.model.train()
        return outs

    def save_adapter(self, dirpath: Path) -> None:
        _save_native(dirpath, self.model, self.native)

    def save_state(self, dirpath: Path, loop_state: dict) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        mx.save_safetensors(str(dirpath / "optimizer.safetensors"), dict(tree_flatten(self.opt.state)))
        (dirpath / "state.json").write_text(json.dumps({**loop_state, "format": 2}))

    def read_state(self, dirpath: Path) -> dict:
        state = json.loads((dirpath / "state.json").read_text())
        if "format" not in state:
            # before the shared loop the MLX run recorded the config as given, not what it used
            state["cfg"].update(packing=False, group_by_length=True)
        return state

    def load_state(self, dirpath: Path, loop_state: dict) -> None:
        import mlx.core as mx
        from mlx.utils import tree_unflatten

        self.model.load_weights(list(mx.load(str(dirpath / "adapters.safetensors")).items()), strict=False)
        self.opt.init(self.model.trainable_parameters())
        self.opt.state = tree_unflatten(list(mx.load(str(dirpath / "optimizer.safetensors")).items()))
        self.steps_done = loop_state["step"]

    def export_adapter(self, out_dir: Path, src: Path | None):
        import mlx.core as mx

        from ..io import atomic_dir

        with atomic_dir(out_dir / "adapter_mlx") as tmp:
            if src is not None:
                for name in ("adapters.safetensors", "adapter_config.json"):
                    (tmp / name).write_bytes((src / name).read_bytes())
            else:
                self.save_adapter(tmp)
        mlx_to_peft(out_dir / "adapter_mlx", out_dir / "adapter", self.model_dir, num_model_layers=len(self.model.layers))
        return out_dir / "adapter", {"adapter_mlx": str(out_dir / "adapter_mlx"),
                                     "mlx_peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3)}

    def close(self) -> None:
        pass


# --- what the objectives need from MLX (train/objectives: the maths is written once) ----------------

_BYPASSED: dict = {}


@contextmanager
def adapter_disabled(model):
    """``model`` as its base for the duration: every mlx-lm LoRA/DoRA layer calls only the layer it
    wraps (``.linear``: the frozen, possibly quantized base), as PEFT's ``disable_adapter()`` does.
    DPO's reference model without a second copy (mlx-lm has no switch for this). Done by switching each adapter layer to a subclass
    whose ``__call__`` skips the adapter (restored on exit); the module tree and its parameters stay as
    they are, so ``value_and_grad`` and checkpointed blocks see the same tree."""
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    swapped = []
    for _, m in model.named_modules():
        cls = type(m)
        if isinstance(m, (LoRALinear, DoRALinear)) and cls not in _BYPASSED.values():
            if cls not in _BYPASSED:
                _BYPASSED[cls] = type(f"Bypassed{cls.__name__}", (cls,), {"__call__": lambda self, x: self.linear(x)})
            m.__class__ = _BYPASSED[cls]
            swapped.append((m, cls))
    if not swapped:
        raise EdgetuneError("DPO's reference model is the base with the adapter disabled; this model has no adapter.",
                            fix="train DPO with --method lora, dora or qlora")
    try:
        yield model
    finally:
        for m, cls in swapped:
            m.__class__ = cls


def token_logps(model, input_ids, labels):
    """(log-prob of each scored token in place, 0 elsewhere; the float mask), both ``[rows, L]`` fp32."""
    import mlx.core as mx
    import mlx.nn as nn

    logits = model(input_ids).astype(mx.float32)
    mask = labels != batching.IGNORE
    tok_logp = -nn.losses.cross_entropy(logits, mx.where(mask, labels, 0), reduction="none")
    maskf = mask.astype(mx.float32)
    return tok_logp * maskf, maskf


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    import mlx.core as mx

    return mx.where(x < -0.6931471805599453, mx.log1p(-mx.exp(x)), mx.log(-mx.expm1(x)))


class MLXKit:
    """The array operations and model calls the objectives' maths uses (``train/objectives``), in MLX.

    mlx-lm models take no position ids and return logits for every position (batches are padded)."""

    name = "mlx"

    @staticmethod
    def logsigmoid(x):
        import mlx.nn as nn

        return nn.log_sigmoid(x)

    log1mexp = staticmethod(log1mexp)

    @staticmethod
    def exp(x):
        import mlx.core as mx

        return mx.exp(x)

    @staticmethod
    def minimum(a, b):
        import mlx.core as mx

        return mx.minimum(a, b)

    @staticmethod
    def maximum(x, v: float):
        import mlx.core as mx

        return mx.maximum(x, v)

    @staticmethod
    def clip(x, lo: float, hi: float):
        import mlx.core as mx

        return mx.clip(x, lo, hi)

    @staticmethod
    def ones_like(x):
        import mlx.core as mx

        return mx.ones_like(x)

    @staticmethod
    def stop_gradient(x):
        import mlx.core as mx

        return mx.stop_gradient(x)

    @staticmethod
    def to_float(x):
        import mlx.core as mx

        return x.astype(mx.float32)

    @staticmethod
    def completion_ce_sum(model, arrays: dict):
        lp, _ = token_logps(model, arrays["input_ids"], arrays["labels"])
        return -lp.sum()

    @staticmethod
    def seq_logps(model, arrays: dict, reference: bool = False):
        lp, mask = MLXKit.token_logps(model, arrays, reference)
        return lp.sum(axis=-1), mask.sum(axis=-1)

    @staticmethod
    def token_logps(model, arrays: dict, reference: bool = False):
        import mlx.core as mx

        if not reference:
            return token_logps(model, arrays["input_ids"], arrays["labels"])
        with adapter_disabled(model):
            lp, mask = token_logps(model, arrays["input_ids"], arrays["labels"])
        return mx.stop_gradient(lp), mask


def run(model_dir, data_dir, out_dir, cfg, choice, *, resume: bool = False, on_step=None, chat_template=None):
    """Train with mlx-lm on ``cfg.objective`` through the shared loop; returns a :class:`report.TrainResult`."""
    from .loop import train_with

    return train_with(MLXBackend, model_dir, data_dir, out_dir, cfg, choice, resume=resume, on_step=on_step,
                      chat_template=chat_template)
