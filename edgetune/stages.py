"""The stage table: one row per stage of ``edgetune run``, in pipeline order.

Everything that names the stages reads them from here: the pipeline (``edgetune.pipeline.PIPELINE``
attaches each row's functions), ``edgetune run --from/--to`` and the command's help, the run folder's
paths (:class:`edgetune.runfolder.RunFolder`: ``RUN/<folder>``), the per-stage cost table
(``edgetune.stageplan.STAGE_COSTS``), ``edgetune plan``'s "off" status and ARCHITECTURE.md.

Columns: ``does`` (one line: ``edgetune plan`` and the run log print it), ``folder`` (what it writes,
relative to the run folder; None: outside it), ``reads`` (the stages whose output hashes its input
hash covers: a change there re-runs it; tests/test_pipeline_stages.py checks each stage's input
function reads exactly these) and ``enabled`` (a config -> bool; ``when`` says it in words).
Adding a stage is a row here, its functions in ``pipeline.py`` and its cost in ``stageplan.py``.
This module imports nothing of edgetune's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _always(cfg: Any) -> bool:
    return True


@dataclass(frozen=True)
class StageRow:
    name: str
    does: str
    folder: str | None  # RUN/<folder> it writes (None: outside the run folder)
    reads: tuple[str, ...] = ()  # earlier stages whose outputs it reads
    enabled: Callable[[Any], bool] = _always  # (RunConfig) -> whether the stage does anything
    when: str = ""  # ``enabled`` in words: "with align.data" ("" = always)


STAGE_TABLE: tuple[StageRow, ...] = (
    StageRow("data", "validate, clean, dedup and split the data", "data"),
    StageRow("train", "fine-tune an adapter on the train split", "train", reads=("data",)),
    StageRow("align", "optional DPO/ORPO/GRPO after SFT", "align", reads=("train",),
             enabled=lambda cfg: cfg.align.enabled, when="with align.data"),
    StageRow("fuse", "merge the final adapter into its base model", "fused", reads=("train", "align")),
    StageRow("export", "convert to GGUF and quantize", "gguf", reads=("fuse",)),
    StageRow("ollama", "write and check the Ollama Modelfile", "ollama", reads=("export",)),
    StageRow("eval", "compare base vs tuned vs quantized on the test split", "eval", reads=("align", "fuse", "export")),
    StageRow("register", "add the model to the registry (<home>/<name>/vN/)", None,
             reads=("train", "align", "export", "ollama", "eval")),
)
STAGE = {s.name: s for s in STAGE_TABLE}
STAGES = tuple(STAGE)


def flow() -> str:
    """``data → train → align → ...``: the stage list as help texts and the README print it."""
    return " → ".join(STAGES)


def stage_help(row: StageRow) -> str:
    """The row's one line with the folder it writes (``RUN/data/``)."""
    return f"{row.does} (RUN/{row.folder}/)" if row.folder else row.does
