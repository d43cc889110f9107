"""The ``align`` stage of ``edgetune run``: preference training (DPO/ORPO) or GRPO after SFT.

SFT teaches the kind of answer, DPO which answer is better, GRPO what the rewards score higher. The stage prepares the preference
pairs of ``align.data`` into ``RUN/align/data/`` (the same cleaning, dedup and split as the data
stage), merges the SFT adapter into the base (``RUN/align/sft_model/``), and trains a fresh adapter
on that merged model with ``align.objective``. Merging first makes the SFT model both the policy at
the start and DPO's reference (the adapter-disabled model), with one copy of the weights in
memory; fuse then merges the align adapter into ``sft_model`` (``RunFolder.final_adapter_dir``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from .errors import EdgetuneError
from .recipes import resolve_data
from .runfolder import RunFolder


def align(run: RunFolder, model_dir: Path, *, resume: bool = False, log=print) -> dict:
    """Run the align stage of ``run`` (its config's ``align:`` section); returns the stage summary."""
    a = run.cfg.align
    if not a.enabled:
        return {"off": "no align.data in the recipe: the train adapter is final"}
    from .data import prepare
    from .fuse import fuse
    from .train import train

    if not resume and run.align_dir.exists():
        shutil.rmtree(run.align_dir)  # inputs changed (or --from align): old checkpoints belong to another run
    source = resolve_data(a.data)
    if not source.exists():
        raise EdgetuneError(f"align.data not found: {source}", where=str(source), fix="fix align.data in the recipe")
    if not (run.align_data_dir / "data_card.json").is_file():  # written last: present means the splits are complete
        from .train.objectives import get

        # pair objectives read preference rows; GRPO reads prompts (+ references) from any row kind
        fmt = "preference" if get(a.objective).preference else run.cfg.data.format
        # replay / mix rows are SFT rows: the align data is the align stage's own (pairs or GRPO prompts)
        data_cfg = dataclasses.replace(run.cfg.data, path=str(source), format=fmt, replay=0.0, mix=None)
        prepare(source, run.align_data_dir, data_cfg, model_dir=model_dir)
    leaked = prompts_seen_in(run.align_data_dir / "test.jsonl", run.split("train"))
    if leaked:
        log(f"[yellow]warning:[/] {leaked} held-out preference prompts are also in the SFT train split "
            f"({run.split('train')}): their preference accuracy is not a held-out figure")
    if not (run.sft_model_dir / "config.json").is_file():  # fuse writes atomically: present means complete
        fuse(model_dir, run.adapter_dir, run.sft_model_dir)
    result = train(run.sft_model_dir, run.align_data_dir, run.align_train_dir, a.train_config(), resume=resume,
                   chat_template=run.cfg.data.chat_template)
    summary: dict[str, Any] = {"adapter": str(run.align_adapter_dir), "sft_model": str(run.sft_model_dir),
                               "objective": a.objective, "resumed": resume, "test_prompts_in_sft_train": leaked}
    if hasattr(result, "as_dict"):
        result = result.as_dict()
    if isinstance(result, dict):
        summary.update({k: v for k, v in result.items() if isinstance(v, (int, float, str)) and k != "adapter_dir"})
    return summary


def _last_user(row: dict) -> str | None:
    turns = row.get("messages") if "messages" in row else row.get("prompt")
    if isinstance(turns, str):
        return turns
    users = [m.get("content") for m in turns or [] if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else None


def prompts_seen_in(pairs: Path, sft_split: Path) -> int:
    """How many preference rows of ``pairs`` ask (last user turn, exact text) what an SFT row asks."""
    if not pairs.is_file() or not sft_split.is_file():
        return 0

    def users(p: Path) -> list[str | None]:
        with open(p, encoding="utf-8") as fh:
            return [_last_user(json.loads(line)) for line in fh if line.strip()]

    seen = set(users(sft_split))
    return sum(1 for u in users(pairs) if u is not None and u in seen)
