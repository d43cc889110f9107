"""The run folder: one object that knows where every stage's output lives.

The run folder is the contract between stages (README, "Where outputs go")::

    RUN/run.yaml          every effective setting, written before anything else
    RUN/manifest.json     what each stage did: status, input hash, output hash, time, summary
    RUN/data/             train/valid/test.jsonl, data_card.json, rejects.jsonl
    RUN/train/            checkpoints/, metrics; RUN/train/adapter/ (PEFT format)
    RUN/align/            only with an ``align:`` section: data/ (preference splits), sft_model/ (base + SFT
                          adapter merged: DPO's reference and the align adapter's base), train/adapter/
    RUN/fused/            base + adapter merged (HF folder)
    RUN/gguf/<name>-<type>.gguf
    RUN/ollama/Modelfile
    RUN/eval/             report.json / report.md / report.html

Each stage's folder is its ``folder`` column in :data:`edgetune.stages.STAGE_TABLE`
(:meth:`RunFolder.stage_dir`). The pipeline writes it; standalone commands (``edgetune export RUN``,
``edgetune ollama RUN``, ``edgetune eval RUN``) read it to find their inputs, so nobody computes these paths twice.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import EdgetuneError
from .stages import STAGE

if TYPE_CHECKING:
    from .config import RunConfig
    from .eval.fit import RowRunner

RUN_YAML = "run.yaml"
MANIFEST = "manifest.json"
SPLITS = ("train", "valid", "test")


def report_metrics(report: dict) -> dict[str, dict[str, float]]:
    """model name -> its flat numeric metrics from an eval report (task metrics unprefixed, regression set prefixed)."""
    out = {}
    for m in report.get("models", []):
        out[m["name"]] = {k: v for k, v in (m.get("metrics") or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


class RunFolder:
    """Paths of one run folder; ``cfg`` is the run's config (read from ``run.yaml`` when not given)."""

    def __init__(self, root: str | Path, cfg: RunConfig | None = None):
        self.root = Path(root)
        if cfg is not None:
            self.__dict__["cfg"] = cfg  # fills the cached property

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    # --- finding one ---------------------------------------------------------------------------

    @staticmethod
    def is_run_folder(path: str | Path) -> bool:
        return (Path(path) / RUN_YAML).is_file()

    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        """An existing run folder; a clear error when ``path`` is not one."""
        if not cls.is_run_folder(path):
            raise EdgetuneError(f"{path} is not a run folder (no {RUN_YAML}).", where=str(path),
                                fix="run `edgetune run RECIPE.yaml` first, or give the run folder it wrote (runs/NAME)")
        return cls(path)

    @cached_property
    def cfg(self) -> RunConfig:
        from .config import load_config

        RunFolder.open(self.root)  # a clear error when there is no run.yaml
        return load_config(self.run_yaml)

    def manifest(self) -> dict:
        from .io import read_json

        return read_json(self.manifest_path) if self.manifest_path.is_file() else {"stages": {}}

    # --- layout --------------------------------------------------------------------------------

    @property
    def run_yaml(self) -> Path:
        return self.root / RUN_YAML

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    def stage_dir(self, stage: str) -> Path:
        """``RUN/<folder>``: where ``stage`` writes (its row of :data:`edgetune.stages.STAGE_TABLE`)."""
        return self.root / STAGE[stage].folder

    @property
    def data_dir(self) -> Path:
        return self.stage_dir("data")

    def split(self, name: str) -> Path:
        """``train`` / ``valid`` / ``test`` JSONL written by the data stage."""
        return self.data_dir / f"{name}.jsonl"

    @property
    def data_card(self) -> Path:
        return self.data_dir / "data_card.json"

    @property
    def train_dir(self) -> Path:
        return self.stage_dir("train")

    @property
    def adapter_dir(self) -> Path:
        return self.train_dir / "adapter"

    @property
    def aligned(self) -> bool:
        """Whether this run has an align stage (preference training after SFT)."""
        return STAGE["align"].enabled(self.cfg)

    @property
    def align_dir(self) -> Path:
        return self.stage_dir("align")

    @property
    def align_data_dir(self) -> Path:
        """The preference splits (train/valid/test.jsonl) the align stage trains and evaluates on."""
        return self.align_dir / "data"

    @property
    def sft_model_dir(self) -> Path:
        """Base + SFT adapter merged: the align stage's base model and DPO's reference."""
        return self.align_dir / "sft_model"

    @property
    def align_train_dir(self) -> Path:
        """The align stage's training folder (checkpoints/, metrics.jsonl, adapter/)."""
        return self.align_dir / "train"

    @property
    def align_adapter_dir(self) -> Path:
        return self.align_train_dir / "adapter"

    @property
    def final_adapter_dir(self) -> Path:
        """The adapter fuse/export use: the align stage's when the run has one, else train's."""
        return self.align_adapter_dir if self.aligned else self.adapter_dir

    def final_adapter_base(self) -> Path:
        """The model :attr:`final_adapter_dir` was trained on (the SFT-merged model after align)."""
        return self.sft_model_dir if self.aligned else self.base_model_dir

    @property
    def preference_data(self) -> Path | None:
        """Held-out preference pairs the eval scores (eval.preference_data, else the align test split)."""
        if self.cfg.eval.preference_data:
            return Path(self.cfg.eval.preference_data)
        from .train.objectives import get

        if not self.aligned or not get(self.cfg.align.objective).preference:
            return None  # GRPO's align data are prompts, not pairs
        return self.align_data_dir / "test.jsonl"

    @property
    def fused_dir(self) -> Path:
        return self.stage_dir("fuse")

    @property
    def gguf_dir(self) -> Path:
        return self.stage_dir("export")

    def gguf(self, qtype: str) -> Path:
        """``RUN/gguf/<model name>-<type>.gguf``."""
        return self.gguf_dir / f"{self.model_name}-{qtype}.gguf"

    @property
    def ollama_dir(self) -> Path:
        return self.stage_dir("ollama")

    @property
    def modelfile(self) -> Path:
        return self.ollama_dir / "Modelfile"

    @property
    def eval_dir(self) -> Path:
        return self.stage_dir("eval")

    def eval_report(self, ext: str = "json") -> Path:
        return self.eval_dir / f"report.{ext}"

    # --- what the config says ------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """The model's name: GGUF file stems, the Modelfile's model, the registry entry."""
        return self.cfg.ollama.name or self.cfg.name

    @property
    def adapter_route(self) -> bool:
        """export.route: adapter — the adapter ships on the base's source GGUF; no merged GGUFs."""
        return self.cfg.export.route == "adapter"

    @property
    def adapter_gguf(self) -> Path:
        """``RUN/gguf/<model name>-adapter.gguf``: the LoRA adapter as a GGUF (the adapter route)."""
        return self.gguf_dir / f"{self.model_name}-adapter.gguf"

    @property
    def export_types(self) -> list[str]:
        """The unquantized conversion first, then each quant type (no repeats); none on the adapter route."""
        if self.adapter_route:
            return []
        e = self.cfg.export
        return [e.outtype] + [q for q in self.quant_types if q != e.outtype]

    @property
    def quant_types(self) -> list[str]:
        """export.quants, with ``auto`` replaced by the type it chose (``auto`` until it has run)."""
        from .qtypes import AUTO
        from .quant.autoquant import chosen_type

        return [chosen_type(self.gguf_dir) or q if q == AUTO else q for q in self.cfg.export.quants]

    @property
    def ggufs(self) -> list[Path]:
        return [self.adapter_gguf] if self.adapter_route else [self.gguf(t) for t in self.export_types]

    @property
    def modelfile_quant(self) -> str:
        """The GGUF type the Modelfile (and the eval's quantized model) uses."""
        qs = self.quant_types
        return self.cfg.ollama.quant or (qs[0] if qs else self.cfg.export.outtype)

    @property
    def base_model_dir(self) -> Path:
        """The base model this run trained on (as resolved when it ran, else from its config)."""
        recorded = self.manifest().get("model_dir")
        if recorded:
            return Path(recorded)
        from .recipes import resolve_model

        return resolve_model(self.cfg.model)

    @property
    def eval_data(self) -> Path:
        return Path(self.cfg.eval.data) if self.cfg.eval.data else self.split("test")

    def eval_specs(self) -> dict[str, str]:
        """label -> model spec: the base model, the SFT model (runs with align), the tuned (fused) model,
        the Modelfile's quantized GGUF."""
        specs = {"base": f"hf:{self.base_model_dir}"}
        if self.aligned and self.sft_model_dir.is_dir():
            specs["sft"] = f"hf:{self.sft_model_dir}"  # SFT alone, so the report shows what align added
        specs["tuned"] = f"hf:{self.fused_dir}"
        if self.adapter_route:  # what Ollama serves: the source quant with the adapter on it
            from .model_dir import read_source

            src = read_source(self.base_model_dir)
            if src is not None and src.path.is_file() and self.adapter_gguf.is_file():
                label = f"{(src.file_type or 'source').lower()}+adapter"
                specs[label] = f"gguf:{src.path}+adapter:{self.adapter_gguf}"
            return specs
        q = self.modelfile_quant
        if self.gguf(q).is_file():
            specs[q] = f"gguf:{self.gguf(q)}"
        return specs

    def eval_metrics(self) -> dict[str, dict[str, float]]:
        """The eval report's metrics per model ({} before the eval stage ran)."""
        from .io import read_json

        p = self.eval_report("json")
        return report_metrics(read_json(p)) if p.is_file() else {}

    def sample_prompt(self, max_chars: int = 300) -> str | None:
        """A user prompt from the run's own held-out data (test, else valid, else train split): what
        the run summary suggests trying and what the post-create smoke chat asks; one line preferred.
        None without one."""
        import json

        multi_line = None
        for split in ("test", "valid", "train"):
            p = self.split(split)
            if not p.is_file():
                continue
            with open(p, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue
                    users = [m.get("content") for m in row.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
                    text = users[-1] if users else row.get("prompt")
                    if isinstance(text, str) and text.strip() and len(text) <= max_chars:
                        if "\n" not in text.strip():
                            return text.strip()  # one line reads best on a command line
                        multi_line = multi_line or " ".join(text.split())
        return multi_line

    def require(self, path: Path, stage: str) -> Path:
        """``path`` if it exists; otherwise an error naming the stage that writes it."""
        if not path.exists():
            raise EdgetuneError(f"{path} is missing: the run's '{stage}' stage has not run.", where=str(self.root),
                                fix=f"run `edgetune run {self.root} --to {stage}` first")
        return path


def fitted_eval_specs(run: RunFolder, *, show_progress: bool = True) -> tuple[dict[str, str], RowRunner]:
    """(label -> spec, the choice) for a run folder's eval: :meth:`RunFolder.eval_specs` with the
    base/SFT/tuned rows moved to GGUFs when the hf runner does not fit (converted here, once)."""
    from .eval.fit import choose
    from .export.gguf import convert

    choice = choose(run.cfg, run.base_model_dir)
    specs = run.eval_specs()
    if choice.kind == "hf":
        return specs, choice
    t = choice.gguf_type
    sources = {"base": run.base_model_dir, "sft": run.sft_model_dir, "tuned": run.fused_dir}
    for label, src in sources.items():
        if label not in specs:
            continue
        path = run.gguf(t) if label == "tuned" and run.gguf(t).is_file() else run.eval_dir / f"{label}-{t}.gguf"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            # the converter itself is verified on the tuned model's export; these are eval inputs
            convert(src, path, t, verify=False, show_progress=show_progress)
        specs[label] = f"gguf:{path}"
    return specs, choice
