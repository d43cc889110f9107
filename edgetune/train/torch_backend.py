"""PyTorch backend: transformers + PEFT LoRA/DoRA on CPU/MPS/CUDA, QLoRA (bitsandbytes NF4) on CUDA.

The loop is ``loop.py``'s, shared with MLX; this module is the torch side of it
(:class:`TorchBackend`): model + adapter setup, one optimizer step with autocast / GradScaler / DDP,
eval, optimizer + scheduler + RNG state, and the PEFT adapter files. We drive the step ourselves
instead of ``transformers.Trainer`` for measured reasons on CPU: packed rows with position-id
restarts (padding-free, the Trainer collators pad), logits computed only at completion-token
positions (the 49k-vocab head dominates a 135M model's FLOPs; the Trainer computes it for every
token, :func:`completion_ce_sum`), and LoRA layers made cheaper on CPU (:func:`speed_up_lora`).
Everything model-related (loading, LoRA/DoRA layers, saving adapters, 4-bit) is transformers/PEFT.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..console import console
from ..errors import EdgetuneError, UnsupportedError
from . import batching
from .batching import lr_lambda
from .common import TrainingInterrupted  # noqa: F401  (re-exported: callers catch it from here)

STATE_FILE = "trainer_state.pt"


def resolve_precision(cfg, device: str) -> str:
    """The autocast dtype: QLoRA computes in bf16/fp16 on CUDA; otherwise edgetune.precision decides."""
    from ..precision import decide

    if cfg.method == "qlora":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"
    return decide("train", device, cfg.precision).dtype


def _scored_logits(lm, input_ids, position_ids, labels):
    """(fp32 logits at the scored positions, the ``labels != -100`` mask). The LM head runs only there:
    the 49k-vocab head dominates a small model's FLOPs. Softcapped where the model softcaps."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    decoder = getattr(base, base.base_model_prefix)
    hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    sel = labels != batching.IGNORE
    logits = base.get_output_embeddings()(hidden[sel]).float()
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits, sel


def completion_ce_sum(lm, input_ids, position_ids, labels):
    """Sum of cross-entropy over the tokens that carry loss; logits only where labels != -100."""
    logits, sel = _scored_logits(lm, input_ids, position_ids, labels)
    return F.cross_entropy(logits, labels[sel], reduction="sum")


def token_logps(lm, input_ids, position_ids, labels):
    """(log-prob of each scored token in place, 0 elsewhere; the float mask), both ``[rows, L]``."""
    logits, sel = _scored_logits(lm, input_ids, position_ids, labels)
    tok_logp = torch.log_softmax(logits, dim=-1).gather(-1, labels[sel].unsqueeze(-1)).squeeze(-1)
    out = torch.zeros(labels.shape, dtype=tok_logp.dtype, device=tok_logp.device).masked_scatter(sel, tok_logp)
    return out, sel.to(tok_logp.dtype)


def sequence_logps(lm, input_ids, position_ids, labels):
    """(sum of log-probs of the scored tokens, number of scored tokens) per row, both ``[rows]`` fp32
    (:func:`token_logps` summed per row)."""
    lp, mask = token_logps(lm, input_ids, position_ids, labels)
    return lp.sum(dim=-1), mask.sum(dim=-1)


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@contextlib.contextmanager
def _reference(lm, reference: bool):
    """The adapter-disabled model without gradient (the reference: no second copy), or ``lm`` as is."""
    if not reference:
        yield
        return
    if not hasattr(lm, "disable_adapter"):
        raise EdgetuneError("The reference model is the base with the adapter disabled; this model has no adapter.",
                            fix="train with --method lora, dora or qlora")
    with torch.no_grad(), lm.disable_adapter():
        yield


class TorchKit:
    """The array operations and model calls the objectives' maths uses (``train/objectives``), in torch."""

    name = "torch"
    logsigmoid = staticmethod(F.logsigmoid)
    log1mexp = staticmethod(log1mexp)
    exp = staticmethod(torch.exp)
    minimum = staticmethod(torch.minimum)
    ones_like = staticmethod(torch.ones_like)

    @staticmethod
    def maximum(x, v: float):
        return x.clamp(min=v)

    @staticmethod
    def clip(x, lo: float, hi: float):
        return x.clamp(lo, hi)

    @staticmethod
    def stop_gradient(x):
        return x.detach()

    @staticmethod
    def to_float(x):
        return x.float()

    @staticmethod
    def completion_ce_sum(lm, arrays: dict):
        return completion_ce_sum(lm, arrays["input_ids"], arrays["position_ids"], arrays["labels"])

    @staticmethod
    def seq_logps(lm, arrays: dict, reference: bool = False):
        with _reference(lm, reference):
            return sequence_logps(lm, arrays["input_ids"], arrays["position_ids"], arrays["labels"])

    @staticmethod
    def token_logps(lm, arrays: dict, reference: bool = False):
        with _reference(lm, reference):
            return token_logps(lm, arrays["input_ids"], arrays["position_ids"], arrays["labels"])


class CompletionLoss(torch.nn.Module):
    """:func:`completion_ce_sum` as a module over ``(input_ids, position_ids, labels)``."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids, labels):
        return completion_ce_sum(self.lm, input_ids, position_ids, labels)


def _dist(device: str):
    """(world_size, rank) from accelerate's process state; initialises gloo/nccl under `accelerate launch`.

    CPU data parallel: ``accelerate launch --multi_gpu --num_processes N script.py`` starts N processes
    through torchrun; ``PartialState(cpu=True)`` then joins them over gloo.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1, 0, None
    from accelerate import PartialState

    st = PartialState(cpu=device == "cpu")
    return st.num_processes, st.process_index, st


def _rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _fix_adapter_config(adapter_dir: Path, model_dir: Path) -> None:
    import json

    p = adapter_dir / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg["base_model_name_or_path"] = str(model_dir)
    p.write_text(json.dumps(cfg, indent=2) + "\n")


def load_model(model_dir: Path, cfg, device: str, precision: str):
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"attn_implementation": "sdpa"}
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if precision == "bf16" else torch.float16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
        kwargs["dtype"] = compute
    else:
        # frozen base weights stored in the compute dtype: autocast then has nothing to cast per step
        kwargs["dtype"] = {"bf16": torch.bfloat16, "fp16": torch.float16 if device == "cuda" else torch.float32}.get(
            precision, torch.float32
        )
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    model.config.use_cache = False
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif device != "cpu":
        model.to(device)
    if cfg.gradient_checkpointing and cfg.method != "qlora":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def add_adapter(model, cfg, targets: list[str]):
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__}
    missing = [t for t in targets if t not in present]
    if missing:
        raise UnsupportedError(
            f"Target module(s) {', '.join(missing)} not found in the model.",
            fix=f"set train.target_modules to names among: {', '.join(sorted(present))}",
        )
    lcfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(targets),
        use_dora=cfg.method == "dora",
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lcfg)


class FastDropout(torch.nn.Module):
    """Inverted dropout whose mask comes from 16-bit slices of random int64s (4 mask bits per draw).

    On CPU ``torch.bernoulli_`` draws one random number per element: with LoRA dropout on all seven
    projections it took 17% of a demo-model training step. This mask costs about half as much
    (2.7 ms vs 5.0 ms for 2048 x 576 bf16, one thread). The drop probability is exact to 1/65536;
    the draws come from torch's default generator, so seeding and checkpointed RNG state hold.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)
        self.threshold = int(round(self.p * 65536)) - 32768
        self.scale = 1.0 / (1.0 - self.p)

    def zero_dropped(self, x):
        """``x`` with the dropped entries zeroed and the kept ones *not* rescaled by 1/(1-p)."""
        n = x.numel()
        bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        return x.masked_fill(bits.view(torch.int16)[:n].view(x.shape) < self.threshold, 0)

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        return self.zero_dropped(x) * self.scale

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MergedLoRA(torch.autograd.Function):
    """``x (W + s·B A)ᵀ``: a LoRA linear without dropout as one matmul, with LoRA's own gradients.

    Why: on a CPU computing in fp32, PEFT's ``base(x) + B(A(x))·s`` spends ~18% of a demo-model
    step on the rank-8 side: ``[tokens, 8] @ [8, out]`` products run at ~6 GFLOP/s (memory-bound on
    a full-size output) and a full-size add follows each. Forming ``W + s·B A`` costs
    ``2·out·in·r`` FLOPs, tiny next to a batch's matmul, and leaves one large product forward and
    one backward. ``W'`` is rebuilt in backward rather than kept (it would pin a copy of every
    weight). Gradients: ``dx = dy W'``, ``dB = s·dyᵀ (x Aᵀ)``, ``dA = s·(dy B)ᵀ x``; ``W`` is frozen.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float):
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scale = scale
        return F.linear(x, torch.addmm(weight, lora_b, lora_a, alpha=scale), bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scale
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dx = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ torch.addmm(weight, lora_b, lora_a, alpha=s)).view(x.shape)
        # [r, out] products, transposed after: a narrow [out, r] GEMM output runs ~3x slower
        d_b = ((x2 @ lora_a.t()).t() @ dy2).t().mul_(s)
        d_a = ((dy2 @ lora_b).t() @ x2).mul_(s)
        return dx, None, None, d_a, d_b, None


def _scale_on_rank_side(m, name: str, merge: bool = False) -> None:
    """Give a plain PEFT LoRA Linear a cheaper forward that computes the same function.

    PEFT computes ``base(x) + B(A(dropout(x))) * scaling``: dropout's 1/(1-p) multiplies the whole
    input and the scaling the whole output, forward and backward. ``B(A(x') * s)`` is the same value
    (B has no bias) with both factors folded into one multiply of r columns. With ``merge`` (fp32,
    no dropout, see :class:`MergedLoRA`) the whole layer is one matmul against ``W + s·B A``.
    """
    original = m.forward
    lora_a, lora_b, drop = m.lora_A[name], m.lora_B[name], m.lora_dropout[name]
    no_dropout = not isinstance(drop, (torch.nn.Dropout, FastDropout)) or drop.p == 0
    base = m.base_layer

    def forward(x, *args, **kwargs):
        if args or kwargs or m.disable_adapters or m.merged or list(m.active_adapters) != [name]:
            return original(x, *args, **kwargs)
        s = m.scaling[name]
        if merge and no_dropout and x.dtype == base.weight.dtype == lora_a.weight.dtype:
            return MergedLoRA.apply(x, base.weight, base.bias, lora_a.weight, lora_b.weight, float(s))
        if m.training and isinstance(drop, FastDropout) and drop.p > 0:
            h = lora_a(drop.zero_dropped(x)) * (s * drop.scale)
        else:
            h = lora_a(drop(x)) * s
        return base(x) + lora_b(h)

    m.forward = forward


def speed_up_lora(model, device: str, use_amp: bool) -> None:
    """Savings in PEFT's LoRA layers that keep what is computed (dropout: same distribution, other draws).

    - Under autocast, PEFT's cast of every activation to the fp32 adapter dtype (and autocast's
      cast straight back to bf16 for the matmul) is skipped: two full copies per adapted layer.
    - On CPU, ``nn.Dropout`` in the adapters is replaced by :class:`FastDropout`, and plain LoRA
      layers (not DoRA) apply the dropout and LoRA scales to rank-r activations
      (:func:`_scale_on_rank_side`). Demo model, batch 8 x 256, one thread: 229 -> 266 -> 287 tok/s.
    - On CPU in fp32 (no autocast) with no LoRA dropout, each plain LoRA layer is one matmul
      against ``W + s·B A`` (:class:`MergedLoRA`).
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    for m in model.modules():
        if use_amp and hasattr(m, "cast_input_dtype_enabled"):
            m.cast_input_dtype_enabled = False
        drop = getattr(m, "lora_dropout", None)
        if device != "cpu" or not isinstance(drop, torch.nn.ModuleDict):
            continue
        for name, d in list(drop.items()):
            if type(d) is torch.nn.Dropout and d.p > 0:
                drop[name] = FastDropout(d.p)
        if type(m) is LoraLinear and len(m.lora_A) == 1:
            (name,) = m.lora_A.keys()
            if name not in getattr(m, "lora_variant", {}) and not m.use_dora.get(name) and m.lora_B[name].bias is None:
                _scale_on_rank_side(m, name, merge=not use_amp)


def _make_optimizer(params, cfg):
    if cfg.method == "qlora":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _copy_files(src: Path, dst: Path, names) -> None:
    for name in names:
        (dst / name).write_bytes((src / name).read_bytes())


class LossModule(torch.nn.Module):
    """``loss_fn(lm, arrays)`` as a module, so DistributedDataParallel can wrap it under ``accelerate launch``."""

    def __init__(self, lm, loss_fn):
        super().__init__()
        self.lm, self.loss_fn = lm, loss_fn

    def forward(self, **arrays):
        return self.loss_fn(self.lm, arrays)


class TorchBackend:
    """The torch side of :class:`edgetune.train.loop.Backend`: PEFT model, AdamW + LambdaLR, autocast, DDP."""

    name = "torch"
    state_file = STATE_FILE

    def __init__(self, model_dir: Path, cfg, choice, targets: list[str]):
        self.model_dir, self.cfg, self.targets = Path(model_dir), cfg, targets
        self.device = choice.device
        self.precision = resolve_precision(cfg, self.device)
        if self.device == "cpu" and self.precision == "fp16":
            console.print("[yellow]fp16 autocast on CPU is slow and unsupported by many kernels; consider bf16 or fp32[/]")
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.world_size, self.rank, _ = _dist(self.device)
        self._modules: dict = {}

    def setup(self, total_steps: int, warmup_steps: int) -> dict:
        cfg, device = self.cfg, self.device
        _seed_all(cfg.seed)
        model = load_model(self.model_dir, cfg, device, self.precision)
        model = add_adapter(model, cfg, self.targets)
        self.use_amp = self.precision in ("bf16", "fp16")
        speed_up_lora(model, device, self.use_amp)
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = _make_optimizer(self.params, cfg)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(total_steps, warmup_steps, cfg.lr_scheduler))
        self.amp_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        self.dev_type = "cuda" if device == "cuda" else "mps" if device == "mps" else "cpu"
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" and device == "cuda" else None
        model.train()
        return {"trainable_params": sum(p.numel() for p in self.params)}

    def _autocast(self):
        return torch.autocast(self.dev_type, dtype=self.amp_dtype) if self.use_amp else contextlib.nullcontext()

    def _arrays(self, batch) -> dict:
        return {k: torch.from_numpy(v).to(self.device) for k, v in vars(batch).items() if isinstance(v, np.ndarray)}

    def _module(self, loss_fn, train: bool):
        """The loss as a module (DDP-wrapped for training when there are several processes)."""
        key = (loss_fn, train and self.world_size > 1)
        if key not in self._modules:
            mod = LossModule(self.model, loss_fn)
            if key[1]:
                from torch.nn.parallel import DistributedDataParallel as DDP

                mod = DDP(mod, device_ids=[torch.cuda.current_device()] if self.device == "cuda" else None)
            self._modules[key] = mod
        return self._modules[key]

    def step(self, batches, loss_fn):
        from .loop import StepStats

        wrapped = self._module(loss_fn, train=True)
        mine = batches[self.rank :: self.world_size]
        units = sum(b.n_target for b in mine)
        loss_sum, sums = 0.0, {}
        for i, b in enumerate(mine):
            last = self.world_size == 1 or i == len(mine) - 1
            with contextlib.nullcontext() if last else wrapped.no_sync():
                with self._autocast():
                    loss, metrics = wrapped(**self._arrays(b))
                scaled = loss / max(units, 1)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.item()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        if self.scaler:
            self.scaler.unscale_(self.opt)
        gnorm = self._grad_norm()  # the same on every process: DDP has averaged the gradients
        if self.world_size > 1:  # the step's loss over all processes, before deciding to apply the step
            t = torch.tensor([loss_sum, float(units), *sums.values()])
            torch.distributed.all_reduce(t)
            loss_sum, units = t[0].item(), t[1].item()
            sums = dict(zip(sums, t[2:].tolist(), strict=True))
        n = max(units, 1)
        stats = StepStats(loss_sum / n, self.sched.get_last_lr()[0], gnorm, {k: v / n for k, v in sums.items()})
        # with fp16's GradScaler, inf/NaN gradients are the scaler's business: it skips that step, lowers its scale
        if not math.isfinite(stats.loss) or (self.scaler is None and not math.isfinite(gnorm)):
            self.opt.zero_grad(set_to_none=True)  # nothing applied: optimizer, scheduler and weights as they were
            if self.scaler:
                self.scaler.update()
            stats.finite = False
            return stats
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return stats

    def _grad_norm(self) -> float:
        """The total gradient norm before clipping (clipped in place when max_grad_norm is set)."""
        if self.cfg.max_grad_norm:
            return float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        grads = [p.grad for p in self.params if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    @torch.no_grad()
    def eval_loss(self, batches, loss_fn) -> dict:
        mod = self._module(loss_fn, train=False)
        self.model.eval()
        tot = n = 0.0
        sums: dict = {}
        for b in batches:
            with self._autocast():
                loss, metrics = mod(**self._arrays(b))
            tot += loss.item()
            n += b.n_target
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        self.model.train()
        n = max(n, 1)
        return {"loss": tot / n, **{k: v / n for k, v in sums.items()}}

    @torch.no_grad()
    def token_logps(self, batch, reference: bool = False) -> np.ndarray:
        """Per-token log-probs of ``batch``'s scored tokens (no dropout, no gradient), numpy ``[rows, L]``."""
        self.model.eval()
        try:
            with self._autocast():
                lp, _ = TorchKit.token_logps(self.model, self._arrays(batch), reference=reference)
        finally:
            self.model.train()
        return lp.float().cpu().numpy()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, n: int, max_new_tokens: int, temperature: float, top_p: float,
                 stop_ids: list[int], pad_id: int, seed: int) -> list[list[int]]:
        """``n`` completions per prompt from the current policy (adapter on, no dropout), grouped by
        prompt; transformers' generate on left-padded prompts with the KV cache. Temperature 0: greedy."""
        sample = temperature > 0
        if not sample:  # greedy: n equal completions; transformers refuses num_return_sequences > 1 there
            prompts, n = [p for p in prompts for _ in range(n)], 1
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            att[i, width - len(p):] = 1
        kw = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if sample else dict(
            do_sample=False, temperature=None, top_p=None, top_k=None)
        if sample:  # greedy draws nothing (eval mode: no dropout): the training RNG stays as it was
            torch.manual_seed(seed)
        self.model.eval()
        try:
            with self._autocast():
                out = self.model.generate(input_ids=ids.to(self.device), attention_mask=att.to(self.device),
                                          max_new_tokens=max_new_tokens, num_return_sequences=n,
                                          eos_token_id=list(stop_ids), pad_token_id=pad_id, use_cache=True, **kw)
        finally:
            self.model.train()
        return [row.tolist() for row in out[:, width:].cpu()]

    def save_adapter(self, dirpath: Path) -> None:
        self.model.save_pretrained(str(dirpath))
        _fix_adapter_config(dirpath, self.model_dir)

    def save_state(self, dirpath: Path, loop_state: dict) -> None:
        state = {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "rng": _rng_state()}
        torch.save({**loop_state, **state}, dirpath / STATE_FILE)

    def read_state(self, dirpath: Path) -> dict:
        return torch.load(dirpath / STATE_FILE, weights_only=False)

    def load_state(self, dirpath: Path, loop_state: dict) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(str(dirpath / "adapter_model.safetensors")))
        self.opt.load_state_dict(loop_state["optimizer"])
        self.sched.load_state_dict(loop_state["scheduler"])
        # the restored schedule position with this run's peak learning rate (a resume may change it)
        peak = self.cfg.learning_rate
        self.sched.base_lrs = [peak] * len(self.opt.param_groups)
        for fn, group in zip(self.sched.lr_lambdas, self.opt.param_groups, strict=True):
            group["initial_lr"], group["lr"] = peak, peak * fn(self.sched.last_epoch)
        self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]
        _set_rng_state(loop_state["rng"])

    def export_adapter(self, out_dir: Path, src: Path | None):
        from ..io import atomic_dir

        adapter_dir = out_dir / "adapter"
        with atomic_dir(adapter_dir) as tmp:
            if src is not None:
                _copy_files(src, tmp, ("adapter_config.json", "adapter_model.safetensors"))
            else:
                self.save_adapter(tmp)
        return adapter_dir, {}

    def close(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def run(model_dir, data_dir, out_dir, cfg, choice, *, resume: bool = False, on_step=None, chat_template=None):
    """Train with torch + PEFT on ``cfg.objective`` through the shared loop; returns a :class:`report.TrainResult`."""
    from .loop import train_with

    return train_with(TorchBackend, model_dir, data_dir, out_dir, cfg, choice, resume=resume, on_step=on_step,
                      chat_template=chat_template)
