"""Training: one interface over the MLX and PyTorch backends.

``train(model_dir, data_dir, out_dir, cfg)`` picks the backend (``select.choose_backend``), checks
every input before loading a model (``support.py``: each setting is honoured by that backend or
refused), sizes the rows to the data and says what a step holds (``sizing.py``), trains with the shared loop (``loop.py``) on the chosen objective (``objectives/``, one module each),
and leaves the run folder other stages read:

    OUT/adapter/          PEFT adapter (adapter_config.json + adapter_model.safetensors) - always
    OUT/adapter_mlx/      native mlx-lm adapter, when the mlx backend ran
    OUT/checkpoints/      last/ and best/ (adapter + optimizer + scheduler + RNG + data position)
    OUT/train_config.yaml every effective setting;  OUT/run.json  versions, hashes, wall time, memory
    OUT/metrics.jsonl     one row per step (+ val_loss at evaluations);  OUT/loss.png
    OUT/samples.jsonl     greedy answers to a few prompts every --sample-every steps (samples.py)
"""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgetuneError
from .memory import estimate_memory
from .report import TrainResult
from .select import Choice, choose_backend

__all__ = ["train", "estimate_memory", "preflight", "TrainResult", "Choice", "choose_backend"]


def preflight(model_dir, data_dir, cfg) -> Choice:
    """Everything that can be checked without loading a model; raises before any heavy work."""
    from ..arch import arch_of_model_dir
    from .batching import check_data_dir
    from .support import resolve

    choice = choose_backend(cfg.backend, cfg.method)
    resolve(cfg, choice.backend)  # every setting is honoured on this backend or refused here, with the fix
    if not Path(model_dir).is_dir():
        raise EdgetuneError(f"Base model folder not found: {model_dir}", where=str(model_dir),
                            fix="pass an HF model folder (edgetune models fetch-demo makes the demo one)")
    arch_of_model_dir(model_dir)
    check_data_dir(data_dir)
    from .objectives import get

    objective = get(cfg.objective)
    if objective.check is not None:  # e.g. GRPO: the rewards parse and every row has the reference they need
        objective.check(cfg, data_dir)
    from .samples import check

    check(cfg, data_dir)  # --select-by: a valid split with prompts and references
    return choice


def train(model_dir, data_dir, out_dir, cfg, resume: bool = False, *, on_step=None, chat_template=None) -> TrainResult:
    """Fine-tune ``model_dir`` on the prepared splits in ``data_dir``; outputs go to ``out_dir``.

    ``on_step(step, row)`` is called after every optimizer step (tests use it to interrupt a run).
    """
    import os

    from . import sizing

    choice = preflight(model_dir, data_dir, cfg)
    # max_seq_len resolved once here (None = from the data), so the loop, checkpoints and
    # train_config.yaml all see the number; the summary prints before any model loads
    cfg, plan = sizing.size(model_dir, data_dir, cfg, choice.backend, chat_template=chat_template,
                            world_size=int(os.environ.get("WORLD_SIZE", "1")))
    if int(os.environ.get("RANK", "0")) == 0:
        sizing.announce(plan)
    if choice.backend == "mlx":
        from . import mlx_backend

        result = mlx_backend.run(model_dir, data_dir, out_dir, cfg, choice, resume=resume, on_step=on_step,
                                 chat_template=chat_template)
    else:
        from . import torch_backend

        result = torch_backend.run(model_dir, data_dir, out_dir, cfg, choice, resume=resume, on_step=on_step,
                                   chat_template=chat_template)
    if chat_template and int(os.environ.get("RANK", "0")) == 0:
        keep_chat_template(result.adapter_dir, chat_template)
    return result


def keep_chat_template(adapter_dir, chat_template: str) -> None:
    """The template the adapter was trained with, kept beside it (``chat_template.jinja``): fuse writes it
    into the fused model, so the GGUF, the Modelfile and eval use what training rendered, not the base's."""
    from ..data.template import resolve_chat_template
    from ..io import write_text

    write_text(Path(adapter_dir) / "chat_template.jinja", resolve_chat_template(chat_template))
