"""The one typed run config: every default lives here.

Precedence: CLI flag > recipe YAML > the defaults below. Each stage reads its own section;
``RunConfig`` bundles them for ``edgetune run``. Sections are plain dataclasses with checks in
``__post_init__`` so a bad value fails when the config is built, not an hour into training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .errors import EdgetuneError
from .qtypes import AUTO, OUTTYPES, QUANTS
from .train.objectives import OBJECTIVES as _OBJECTIVES
from .train.objectives import params as _objective_params

# "section.field" -> allowed values: validated here, offered by the CLI's click.Choice options.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.format": ("auto", "chat", "instruction", "sharegpt", "completion", "preference"),
    "data.dedup": ("exact", "near", "off"),
    "data.overlength": ("drop", "truncate", "keep"),
    # reasoning (assistant reasoning_content) and the template's thinking switch (edgetune/reasoning.py)
    "data.thinking": ("auto", "on", "off", "text"),
    "train.backend": ("auto", "mlx", "torch"),
    "train.method": ("lora", "dora", "qlora", "full"),
    "train.objective": tuple(_OBJECTIVES),  # one module each under edgetune/train/objectives/
    # the objectives' own choice settings (GRPO's loss_type, scale_rewards), declared in their modules
    **{f"train.{p.name}": p.choices for p in _objective_params() if p.choices},
    "train.lr_scheduler": ("cosine", "linear", "constant"),
    # task metrics the best checkpoint can follow (train/samples.py scores them with eval's metrics); None = val loss
    "train.select_by": ("exact_match", "contains", "rouge_l", "chrf", "json_valid", "json_schema", "json_fields"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.report_to": ("none", "tensorboard", "wandb"),
    "export.outtype": OUTTYPES,  # the GGUF types table (export/qtypes.py)
    "export.route": ("merge", "adapter"),
    "eval.dtype": ("float32", "bfloat16", "float16", "auto"),
    "eval.runner": ("auto", "hf", "gguf"),
    "eval.thinking": ("auto", "on", "off", "both"),
}


def _check_choices(section: str, obj: Any) -> None:
    """Check every field of ``obj`` that has a CHOICES entry (None passes where the field's default is None)."""
    defaults = {f.name: f.default for f in fields(obj)}
    for key, choices in CHOICES.items():
        sec, name = key.split(".")
        if sec == section and not (getattr(obj, name) is None and defaults.get(name) is None):
            _check_choice(section, name, getattr(obj, name), choices)


def _check_choice(section: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise EdgetuneError(
            f"{section}.{name} = {value!r} is not one of {', '.join(map(str, choices))}.",
            fix=f"set {section}.{name} to one of: {', '.join(map(str, choices))}",
        )


def _check_range(section: str, name: str, value: float, lo: float, hi: float) -> None:
    if value is not None and not (lo <= value <= hi):
        raise EdgetuneError(f"{section}.{name} = {value!r} is outside [{lo}, {hi}].", fix=f"choose a value in [{lo}, {hi}]")


@dataclass
class DataConfig:
    path: str | None = None  # file, folder of files, or save_to_disk dataset
    format: str = "auto"  # auto|chat|instruction|sharegpt|completion|preference
    valid_ratio: float = 0.1
    test_ratio: float = 0.1
    seed: int = 42
    group_by: str | None = None  # split by this field so one group never spans splits (no leakage)
    dedup: str = "exact"  # exact|near|off
    near_threshold: float = 0.8  # MinHash Jaccard threshold for near-duplicates
    redact_pii: bool = False
    max_seq_len: int = 2048
    overlength: str = "drop"  # drop|truncate|keep examples longer than max_seq_len tokens
    chat_template: str | None = None  # file or known family name, for models without one
    # Thinking models: auto = a record with reasoning is rendered with thinking on, one without with
    # thinking off (the template's enable_thinking; a record's own enable_thinking wins); on / off =
    # every record so (off drops reasoning); text = reasoning kept as <think>…</think> text in the
    # answer, for a template without a thinking block (otherwise such records are rejected)
    thinking: str = "auto"
    # replay against forgetting (edgetune/data/replay.py): this share of the train split is the base
    # model's own answers to shipped general prompts (generated once, cached); 0 = off
    replay: float = 0.0
    # more sources mixed into the train split at fixed shares, chat and text rows alike:
    # [{path: general.jsonl, share: 0.1}, ...]
    mix: list[dict] | None = None

    def __post_init__(self):
        _check_range("data", "replay", self.replay, 0.0, 0.8)
        if self.dedup in (False, "False", "false"):  # YAML 1.1 reads a bare `dedup: off` as false
            self.dedup = "off"
        if isinstance(self.thinking, bool):  # YAML 1.1: a bare on/off is a boolean
            self.thinking = "on" if self.thinking else "off"
        _check_choices("data", self)
        _check_range("data", "valid_ratio", self.valid_ratio, 0.0, 0.9)
        _check_range("data", "test_ratio", self.test_ratio, 0.0, 0.9)
        _check_range("data", "near_threshold", self.near_threshold, 0.05, 1.0)


def flag(default: Any = None, help: str = "", *, name: str | None = None, short: str | None = None,
         comma: bool = False, multiple: bool = False, default_factory: Any = None) -> Any:
    """A config field with an ``edgetune train`` flag: its default and help text live here, once;
    ``edgetune.cli.train`` generates the option (type from the annotation, choices from CHOICES, the
    default appended to the help). ``name``: the flag when it is not ``--field-name``; ``comma``: a
    list given as one comma-separated value; ``multiple``: a list given by repeating the flag."""
    meta = {"help": help, "flag": name, "short": short, "comma": comma, "multiple": multiple}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _with_objective_fields(cls):
    """Add every objective's own settings (``Param``s in ``edgetune/train/objectives/*.py``: DPO's
    beta, GRPO's num_generations...) to the class as fields with their flags, before ``@dataclass``
    sees it, so a new objective declares its settings in its own module."""
    for p in _objective_params():
        if p.name in cls.__annotations__:
            continue
        cls.__annotations__[p.name] = p.type
        lst = p.type.startswith("list") and p.default is not None
        setattr(cls, p.name, flag(p.default, p.help, multiple=p.multiple, default_factory=list if lst else None,
                                  name=(p.flag[:-1] if p.multiple and p.flag.endswith("s") else None)))
    return cls


_OBJECTIVES_HELP = "What training optimises (torch and MLX): " + "; ".join(f"{n} = {o.summary}" for n, o in _OBJECTIVES.items())


@dataclass
@_with_objective_fields
class TrainConfig:
    """The ``train:`` section; a field made with :func:`flag` is also an ``edgetune train`` option."""

    backend: str = flag("auto", "Training backend.")
    method: str = flag("lora", "Fine-tuning method.")
    # what a step optimises: one module each under train/objectives/ (sft = completion-only cross entropy,
    # dpo / orpo = preference pairs, grpo = sampled completions scored by rewards); each objective's own
    # settings (beta, rpo_alpha, orpo_lambda, num_generations, rewards...) are added from its module
    objective: str = flag("sft", _OBJECTIVES_HELP)
    rank: int = flag(16, "LoRA rank.", short="-r")
    alpha: float = flag(32.0, "LoRA alpha (scale = alpha / rank).")
    dropout: float = flag(0.05, "LoRA dropout.")
    target_modules: list[str] | None = flag(None, "Comma-separated linear layer names (default: all attention + MLP "
                                                  "linears of the architecture, edgetune.arch).", comma=True)
    learning_rate: float = flag(2e-4, "Peak learning rate.", name="--lr")
    lr_scheduler: str = flag("cosine", "Learning-rate schedule after the warmup.")
    warmup_ratio: float = flag(0.05, "Share of the steps spent warming the learning rate up (keeps the first "
                                     "noisy steps from wrecking fresh adapters).")
    epochs: float = flag(1.0, "Passes over the train split.")
    iters: int | None = flag(None, "Optimizer steps (overrides --epochs).")
    batch_size: int = flag(4, "Rows per micro-batch.", short="-b")
    grad_accum: int = flag(1, "Micro-batches per optimizer step.")
    # None = from the data (train/sizing.py); a fixed 2048 packs ~180 short chats into one row and runs for hours
    max_seq_len: int | None = flag(None, "Row length in tokens (default: the train split's p99 rounded up to 64, "
                                         "capped by the model's context and 2048).")
    seed: int = 42  # --seed is the option every command shares (cli/options.py)
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    # None = the backend's default (train/support.py): torch packs, MLX pads length-grouped batches
    # (its models take no position ids, so packed examples would attend to each other)
    packing: bool | None = flag(None, "Padding-free packed batches (default: on with torch; MLX pads and refuses --packing).")
    group_by_length: bool | None = flag(None, "Padded batches of similar lengths (default: on with MLX; needs "
                                              "--no-packing with torch).")
    eval_every: int = flag(50, "Validation loss every N steps (0 = at the end only).")
    save_every: int = flag(100, "Checkpoint every N steps (the resume point).")
    early_stopping_patience: int | None = flag(None, "Stop after N evaluations without improvement (the best adapter "
                                                     "is kept).", name="--early-stopping")
    precision: str = flag("auto", "Compute dtype (auto: edgetune.precision's choice for this device; see edgetune doctor).")
    gradient_checkpointing: bool = flag(False, "Recompute activations in the backward pass: less memory, slower steps.")
    report_to: str = flag("none", "Where to log metrics beside metrics.jsonl.")
    num_threads: int | None = flag(None, "torch CPU threads (default: all cores; MLX refuses it).", name="--threads")
    # training health (train/health.py). A non-finite loss or gradient norm always stops the run (the
    # step is not applied; checkpoints/last keeps the last save). A loss spike is warned once per
    # episode after 5 steps, `spike: true` in metrics.jsonl, counted in the result
    spike_factor: float = flag(2.0, "Warn when a step's loss exceeds this many times the median of the last 20 steps' "
                                    "(and is 0.5 above it); 0 = off. A NaN/inf loss or gradient always stops the run.")
    # train/samples.py; without a valid split the train split's prompts
    sample_every: int = flag(0, "Every N steps (and at the last), greedy answers to a few valid prompts into "
                                "OUTPUT/samples.jsonl (0 = off).")
    sample_prompts: int = flag(3, "Prompts --sample-every answers.")
    sample_max_tokens: int = flag(64, "New tokens per sample answer.")
    # edgetune.eval.metrics names; None = the validation loss
    select_by: str | None = flag(None, "Pick the best checkpoint (and early-stop) by this task metric of greedy answers "
                                       "to the valid split instead of the validation loss; needs --eval-every and "
                                       "--early-stopping.")
    select_by_limit: int = flag(16, "Valid rows --select-by answers per evaluation.")

    def __post_init__(self):
        _check_choices("train", self)
        if self.spike_factor and not 1.0 < self.spike_factor <= 1000.0:
            raise EdgetuneError(f"train.spike_factor = {self.spike_factor!r} must be 0 (off) or in (1, 1000].",
                                fix="e.g. spike_factor: 2 (a step at twice the recent median loss), or 0 to turn it off")
        for name, lo, hi in (("sample_every", 0, 10**9), ("sample_prompts", 1, 64), ("sample_max_tokens", 1, 8192),
                             ("select_by_limit", 1, 10000)):
            _check_range("train", name, getattr(self, name), lo, hi)
        if self.select_by is not None:
            if not self.eval_every:
                raise EdgetuneError(f"train.select_by = {self.select_by!r} picks the best of several evaluations; "
                                    "eval_every = 0 evaluates only at the end.",
                                    fix="set eval_every (e.g. --eval-every 50), or drop select_by")
            if not self.early_stopping_patience:
                raise EdgetuneError(f"train.select_by = {self.select_by!r} chooses checkpoints/best, but the adapter "
                                    "is exported from checkpoints/best only with early stopping.",
                                    fix="add --early-stopping N (train.early_stopping_patience; e.g. 3), or drop select_by")
        _check_range("train", "dropout", self.dropout, 0.0, 0.9)
        _check_range("train", "warmup_ratio", self.warmup_ratio, 0.0, 0.5)
        for p in _objective_params():
            if p.lo is not None:
                _check_range("train", p.name, getattr(self, p.name), p.lo, p.hi)
        if self.objective == "dpo" and self.beta == 0:
            raise EdgetuneError("train.beta = 0 makes the DPO loss constant.", fix="use a beta > 0 (default 0.1)")
        if self.rank < 1:
            raise EdgetuneError(f"train.rank must be >= 1, got {self.rank}.", fix="use e.g. rank: 16")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise EdgetuneError("train.batch_size and train.grad_accum must be >= 1.")


@dataclass
class AlignConfig(TrainConfig):
    """The optional second training stage of ``edgetune run`` (``align:``): preference training
    (DPO/ORPO) on top of the SFT adapter. The SFT adapter is merged into the base first, so the
    reference model of DPO is the SFT model (policy at start) and no second copy sits in memory.
    Every ``train`` setting applies; the defaults differ where preference training wants them to."""

    data: str | None = None  # preference rows (dpo/orpo) or prompts with references (grpo): file or folder; None = no align stage
    objective: str = "dpo"  # dpo|orpo|grpo (sft belongs in train:)
    learning_rate: float = 5e-5  # DPO moves a finished SFT model: far gentler than SFT's rate
    packing: bool | None = False  # pairs are padded, never packed

    def __post_init__(self):
        super().__post_init__()
        allowed = [n for n, o in _OBJECTIVES.items() if o.align]
        if self.objective not in allowed:
            raise EdgetuneError(f"align.objective = {self.objective!r}: the align stage runs after SFT.",
                                fix=f"use objective: {' or '.join(allowed)} (SFT is the train: section)")

    @property
    def enabled(self) -> bool:
        return bool(self.data)

    def train_config(self) -> TrainConfig:
        """The plain ``TrainConfig`` the trainer runs with (``data`` is the pipeline's business)."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})


@dataclass
class ExportConfig:
    outtype: str = "f16"  # f16|bf16|f32|q8_0: the unquantized conversion
    # llama.cpp quant types, or [auto]: quantize `ladder`, measure each against the unquantized
    # export on held-out prompts, ship the smallest that passes max_kl and min_top1
    quants: list[str] = field(default_factory=lambda: ["q4_k_m"])
    # importance matrix: "auto" computes one from `calib` (a run: its train split) when a quant type
    # reads one (export/qtypes.py) and calibration data exists; "off"; or an imatrix file
    imatrix: str | None = "auto"
    calib: str | None = None  # calibration JSONL/text for the imatrix (None: the run's train split)
    # the --quant auto gate; defaults from llama.cpp's published Q4_K_M figures (Llama 3 8B vs F16:
    # mean KL 0.031, top-1 agreement about 90%): "as good as a typical 4-bit quant"
    max_kl: float = 0.03
    min_top1: float = 0.90
    ladder: list[str] | None = None  # types --quant auto tries (None: the ladder column of export/qtypes.py)
    verify: bool = True  # compare GGUF with HF after writing
    # merge: fuse the adapter, convert and quantize (every GGUF below); adapter: the base was imported from a
    # GGUF/Ollama model (`edgetune models import`): ship the adapter GGUF on that unmodified source file
    # (Modelfile FROM the same Ollama name or file + ADAPTER), checked against the imported HF model + adapter
    route: str = "merge"

    def __post_init__(self):
        _check_choices("export", self)
        self.quants = [str(q).strip().lower().replace("-", "_") for q in self.quants]
        for q in self.quants:
            _check_choice("export", "quants", q, (*QUANTS, AUTO))
        if AUTO in self.quants and len(self.quants) > 1:
            raise EdgetuneError(f"export.quants = {self.quants}: 'auto' picks one type and cannot be combined.",
                                fix="use quants: [auto] or a list of types")
        if self.ladder is not None:
            self.ladder = [str(q).strip().lower().replace("-", "_") for q in self.ladder]
            for q in self.ladder:
                _check_choice("export", "ladder", q, QUANTS)
        _check_range("export", "max_kl", self.max_kl, 0.0, 100.0)
        _check_range("export", "min_top1", self.min_top1, 0.0, 1.0)


@dataclass
class OllamaConfig:
    name: str | None = None  # ollama model name; None = run name
    system: str | None = None  # None = the training data's dominant system prompt, if any
    template: str | None = None  # Go template file for an unrecognised chat template
    quant: str | None = None  # which GGUF the Modelfile uses (None = first of export.quants)
    temperature: float | None = None  # None = from generation_config.json
    top_p: float | None = None
    top_k: int | None = None
    repeat_penalty: float | None = None
    num_ctx: int | None = None  # None = the model's context length, capped at 8192 (Ollama preallocates the KV cache)
    create: bool = False  # run `ollama create` when ollama is on PATH
    check: bool = True  # render TEMPLATE vs the chat template before writing; refuse on a mismatch

    def __post_init__(self):
        _check_range("ollama", "temperature", self.temperature, 0.0, 2.0)
        _check_range("ollama", "top_p", self.top_p, 0.0, 1.0)
        if self.top_k is not None and self.top_k < 0:
            raise EdgetuneError(f"ollama.top_k must be >= 0, got {self.top_k}.")
        if self.num_ctx is not None and self.num_ctx < 16:
            raise EdgetuneError(f"ollama.num_ctx must be >= 16, got {self.num_ctx}.", fix="e.g. num_ctx: 4096")


@dataclass
class EvalConfig:
    data: str | None = None  # None = the run's test split
    metrics: list[str] | None = None  # None = chosen from the references (JSON / labels / free text)
    max_tokens: int = 256
    temperature: float = 0.0  # greedy by default: comparable runs, no sampling noise in deltas
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0
    stop: list[str] = field(default_factory=list)  # extra stop strings (end-of-turn always stops)
    limit: int | None = None  # evaluate at most N examples
    # the regression set run next to the task: true = the shipped general-capability set, false = none,
    # or a list of "shipped" and the user's own files (eval/data.py load_regression)
    regression: bool | list[str] = True
    regression_max_tokens: int = 96  # its answers are short; caps time spent on rambling models
    nll: bool = True  # mean NLL / perplexity of the references (runners with logits: eval.runners.logit_kinds())
    schema: str | None = None  # JSON-schema file for json_schema (None = inferred from references)
    regex: str | None = None  # pattern for the regex metric
    baseline: str | None = None  # model name deltas and --max-regression compare against (None = first)
    gates: dict[str, float] = field(default_factory=dict)  # METRIC -> minimum value
    max_regression: dict[str, float] = field(default_factory=dict)  # METRIC -> allowed drop vs baseline
    max: dict[str, float] = field(default_factory=dict)  # METRIC -> maximum value (lower-is-better metrics: nll, latency)
    # a user's own eval data that duplicates (exactly or nearly) training rows is refused unless allowed
    allow_overlap: bool = False
    judge: str | None = None  # runner SPEC for pairwise LLM-as-judge (off by default: slow, noisy)
    drift_reference: str | None = None  # model name whose logits the others are compared to
    worst: int = 5  # worst examples shown side by side in report.md
    n_ctx: int = 2048  # llama.cpp context for gguf runners
    batch_size: int | None = None  # conversations generated together (hf); None = edgetune.precision's choice; latency is then per batch
    dtype: str = "auto"  # hf runner dtype; auto = edgetune.precision's choice for this device (see doctor)
    # the run's base/tuned rows: auto = the hf runner when its whole model fits the memory available,
    # else llama.cpp over a GGUF (edgetune/eval/fit.py); an 8B model in fp32 is 32 GB
    runner: str = "auto"
    chat_template: str | None = None  # template file / family for models without one
    # preference pairs (prompt/chosen/rejected): each logit runner's accuracy at ranking chosen above
    # rejected (summed completion log-probs). None = the run's align test split (runs with align:)
    preference_data: str | None = None
    # thinking templates (edgetune/reasoning.py): auto = the task set with thinking on and again off
    # (``think_off.*`` metrics) when the template has a switch; on / off / both. Metrics score the final
    # answer; reasoning_rate / reasoning_chars say how much the model reasoned
    thinking: str = "auto"

    def __post_init__(self):
        if isinstance(self.thinking, bool):  # YAML 1.1: a bare on/off is a boolean
            self.thinking = "on" if self.thinking else "off"
        _check_range("eval", "temperature", self.temperature, 0.0, 5.0)
        _check_range("eval", "top_p", self.top_p, 0.0, 1.0)
        _check_choices("eval", self)
        if self.max_tokens < 1:
            raise EdgetuneError(f"eval.max_tokens must be >= 1, got {self.max_tokens}.")
        if self.limit is not None and self.limit < 1:
            raise EdgetuneError(f"eval.limit must be >= 1, got {self.limit}.")
        if self.regression is None or isinstance(self.regression, str):  # YAML "regression:" (null) is off
            self.regression = [self.regression] if self.regression else False
        if isinstance(self.regression, (list, tuple)):
            if not all(isinstance(v, str) and v.strip() for v in self.regression):
                raise EdgetuneError(f"eval.regression = {self.regression!r}: list entries are 'shipped' or file paths.",
                                    fix="e.g. regression: [shipped, golden.jsonl] (or true / false)")
            self.regression = [v.strip() for v in self.regression] or False
        elif not isinstance(self.regression, bool):
            raise EdgetuneError(f"eval.regression = {self.regression!r} is not true, false or a list of files.",
                                fix="e.g. regression: [shipped, golden.jsonl]")


@dataclass
class RunConfig:
    name: str = "run"
    model: str = ""  # base model folder (HF format)
    output: str = "runs"  # run folder = output/name
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    align: AlignConfig = field(default_factory=AlignConfig)  # optional: DPO/ORPO after train (align.data set)
    export: ExportConfig = field(default_factory=ExportConfig)
    ollama: OllamaConfig = field(default_factory=OllamaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output) / self.name


# Settings that were removed: (section, name) -> (the value older run.yaml files record, what to do
# instead). That value is dropped quietly so old run folders still load; any other value is an error.
REMOVED = {
    ("export", "adapter_gguf"): (False, "it was never read; write a GGUF LoRA adapter with `edgetune export adapter`"),
}

SECTIONS = {"data": DataConfig, "train": TrainConfig, "align": AlignConfig, "export": ExportConfig, "ollama": OllamaConfig, "eval": EvalConfig}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Coerce a YAML/CLI value to the annotated type (handles Optional, list, bool strings)."""
    if value is None:
        return None
    origin = get_origin(typ)
    args = [a for a in get_args(typ) if a is not type(None)]
    if bool in args and any(get_origin(a) is list for a in args):  # bool | list[str]: eval.regression
        word = isinstance(value, str) and value.lower() in ("1", "0", "true", "false", "yes", "no", "on", "off")
        if isinstance(value, (bool, int)) or word:
            return _coerce(value, bool, where)
        return _coerce(value, list[str], where) if isinstance(value, (str, list, tuple)) else value
    if origin in (list,) or (args and get_origin(args[0]) is list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return list(value)
    if origin is dict or (args and get_origin(args[0]) is dict):
        return dict(value)
    base = args[0] if args else typ
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if base in (int, float, str):
            if base is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return base(value)
    except (TypeError, ValueError):
        raise EdgetuneError(f"{where} = {value!r} is not a valid {getattr(base, '__name__', base)}.") from None
    return value


def section_from_dict(cls, data: dict | None, where: str):
    data = dict(data or {})
    section = where.rsplit(":", 1)[-1]
    for (sec, name), (old_default, instead) in REMOVED.items():
        if sec == section and name in data:
            if data.pop(name) != old_default:
                raise EdgetuneError(f"The setting {section}.{name} in {where} was removed.", fix=instead)
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise EdgetuneError(
            f"Unknown setting(s) {', '.join(unknown)} in {where}.",
            fix=f"valid settings: {', '.join(sorted(names))}",
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(raw: dict, where: str = "recipe") -> RunConfig:
    if not isinstance(raw, dict):
        raise EdgetuneError(f"{where} must be a YAML mapping at the top level.")
    raw = dict(raw)
    kwargs: dict[str, Any] = {}
    for key, cls in SECTIONS.items():
        kwargs[key] = section_from_dict(cls, raw.pop(key, None), f"{where}:{key}")
    top = {f.name for f in fields(RunConfig)} - set(SECTIONS)
    unknown = sorted(set(raw) - top)
    if unknown:
        raise EdgetuneError(f"Unknown top-level key(s) {', '.join(unknown)} in {where}.", fix=f"valid keys: {', '.join(sorted(top | set(SECTIONS)))}")
    for k, v in raw.items():
        kwargs[k] = str(v) if v is not None else ""
    return RunConfig(**kwargs)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a recipe YAML and apply ``key=value`` / ``section.key=value`` overrides."""
    import yaml  # here, not at the top: the CLI reads CHOICES without paying for yaml

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise EdgetuneError(f"Recipe not found: {p}", where=str(p)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise EdgetuneError(f"Invalid YAML: {exc}", where=where, fix="fix the YAML syntax") from None
    for item in overrides or []:
        apply_override(raw, item)
    return config_from_dict(raw, where=str(p))


def apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise EdgetuneError(f"--set {item!r} is not KEY=VALUE.", fix="e.g. --set train.iters=100")
    key, value = item.split("=", 1)
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    import yaml

    node[parts[-1]] = yaml.safe_load(value) if value else None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def override(section: Any, **values: Any) -> Any:
    """Return a copy of ``section`` with the non-None ``values`` set (CLI flags win over YAML)."""
    given = {k: v for k, v in values.items() if v is not None}
    return dataclasses.replace(section, **given) if given else section
