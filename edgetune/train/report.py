"""What a training run leaves beside its adapter: metrics.jsonl, loss.png, train_config.yaml, run.json."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io import atomic_path, sha256_file, write_json, write_jsonl, write_text


@dataclass
class TrainResult:
    adapter_dir: str
    final_train_loss: float | None
    best_val_loss: float | None
    steps: int
    tokens_seen: int
    wall_s: float
    backend: str = ""
    device: str = ""
    precision: str = ""
    stopped_early: bool = False
    adapter_from: str = "last"  # last|best@STEP
    padding_fraction: float | None = None
    peak_rss_gb: float | None = None
    loss_spikes: int = 0  # spike episodes (train/health.py)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def __getitem__(self, key):  # dict-style access for callers that expect a mapping
        return getattr(self, key)


class Reporter:
    """``report_to`` tensorboard|wandb: every metrics row also goes there (rank 0 only).

    A missing package is an error before training starts, not a run that quietly logs nowhere.
    """

    def __init__(self, kind: str, out_dir: Path, cfg, enabled: bool = True):
        self.kind, self.w = kind, None
        if not enabled or kind == "none":
            return
        from ..errors import EdgetuneError

        try:
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.w = SummaryWriter(str(out_dir / "tensorboard"))
            elif kind == "wandb":
                import wandb

                from ..config import to_dict

                self.w = wandb.init(project="edgetune", config=to_dict(cfg), dir=str(out_dir))
        except ImportError as exc:
            pkg = "torch + tensorboard" if kind == "tensorboard" else "wandb"
            raise EdgetuneError(f"train.report_to = {kind!r} needs {pkg}, which is not installed ({exc}).",
                                fix=f"pip install {'tensorboard' if kind == 'tensorboard' else 'wandb'}, "
                                    "or use --report-to none (metrics.jsonl is always written)") from None

    def log(self, row: dict) -> None:
        if self.w is None:
            return
        vals = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.kind == "tensorboard":
            for k, v in vals.items():
                self.w.add_scalar(k, v, row["step"])
        else:
            self.w.log(vals, step=row["step"])

    def close(self) -> None:
        if self.w is not None:
            (self.w.close if self.kind == "tensorboard" else self.w.finish)()
            self.w = None


def peak_rss_gb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (1 << 30 if sys.platform == "darwin" else 1 << 20), 3)


def write_metrics(out_dir: Path, rows: list[dict]) -> None:
    write_jsonl(out_dir / "metrics.jsonl", rows)


def plot_loss(out_dir: Path, rows: list[dict]) -> Path | None:
    """loss.png: train loss per step and validation loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=False), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val, strict=False), "o-", label="val loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / "loss.png"
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def write_train_config(out_dir: Path, cfg, resolved: dict) -> None:
    import yaml

    from ..config import to_dict

    doc = {"train": to_dict(cfg), "resolved": resolved}
    write_text(out_dir / "train_config.yaml", yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("edgetune", "torch", "transformers", "peft", "accelerate", "mlx", "mlx-lm", "bitsandbytes"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def data_hashes(data_dir: Path) -> dict:
    """sha256 of the split files and the data card (when the data stage wrote one)."""
    out = {}
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl", "data_card.json", "card.json"):
        p = Path(data_dir) / name
        if p.exists():
            out[name] = sha256_file(p)
    return out


def write_run_json(out_dir: Path, *, model_dir, data_dir, result: TrainResult, resolved: dict) -> None:
    write_json(
        out_dir / "run.json",
        {
            "stage": "train",
            "base_model": str(Path(model_dir).resolve()),
            "data_dir": str(Path(data_dir).resolve()),
            "data_sha256": data_hashes(Path(data_dir)),
            "versions": _versions(),
            "git_commit": _git_commit(),
            "host": {"os": platform.platform(), "cpus": os.cpu_count()},
            "resolved": resolved,
            "result": result.as_dict(),
        },
    )
