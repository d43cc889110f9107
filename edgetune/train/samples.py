"""Greedy answers while training: ``--sample-every`` shows what the model says, ``--select-by`` picks
the best checkpoint by a task metric of its answers instead of the validation loss.

Both render a prepared row's prompt exactly as training renders the row (``data.template.render_prompt``
with the row's ``tools`` and ``enable_thinking``, the generation prompt added) and generate with the
backend being trained (``Backend.generate``, greedy, no dropout; the training RNG is left alone), so
nothing depends on the framework. Prompts are the turns before a row's last assistant turn (chat
rows), the prompt (prompt/completion and preference rows); that last turn (or the completion, or the
chosen answer) is the reference. Text rows have no prompt and are skipped.

* **Samples** (``sample_every`` N > 0): the first ``sample_prompts`` usable rows of the valid split
  (the train split when there is none), answered with at most ``sample_max_tokens`` new tokens every
  N steps and at the run's last step (early stopping included), on the main process; appended to
  ``OUT/samples.jsonl`` as ``{"step", "row", "prompt", "output", "reference"}`` (``prompt``: the last
  user turn's text; ``row``: its line in the split file; ``output``: the decoded answer, reasoning
  included). Not tied to ``eval_every``: set both to the same N to see answers beside the val loss.
  A resumed run drops the rows of steps after its checkpoint first. The first answer is printed
  above the progress bar.
* **Selection** (``select_by`` METRIC): at every evaluation, the first ``select_by_limit`` valid rows
  with a reference are answered (at most the longest reference's tokens, its reasoning included,
  + 32 new tokens) and scored with ``edgetune.eval.metrics.score_example`` (a thinking template's
  reasoning is split off first, as eval does). The mean is recorded as ``val_METRIC`` and drives
  ``checkpoints/best`` and early stopping in the metric's direction (``metrics.DIRECTION``); a tie
  keeps the earlier checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import CHOICES
from ..errors import EdgetuneError

# task metrics a checkpoint can be chosen by (config's table): the per-example text metrics of
# edgetune.eval.metrics that need nothing beyond an answer and its reference (json_schema infers the
# schema from them)
SELECT_METRICS = CHOICES["train.select_by"]
CHUNK = 8  # prompts generated together
SELECT_SLACK = 32  # new tokens beyond the longest reference
SELECT_CAP = 2048


@dataclass
class PromptRow:
    row: int  # line number in the split file (1-based)
    messages: list[dict]  # the prompt turns
    reference: str | None
    tools: Any = None
    thinking: bool | None = None  # the row's enable_thinking (None: the template's default)
    reasoning: str | None = None  # the reference turn's reasoning, if any

    @property
    def prompt(self) -> str:
        users = [m.get("content") for m in self.messages if m.get("role") == "user"]
        text = users[-1] if users else self.messages[-1].get("content")
        return text if isinstance(text, str) else ""


def prompt_rows(path: Path, limit: int, *, need_reference: bool = False) -> list[PromptRow]:
    """The first ``limit`` rows of a prepared split that have a prompt (and a reference, if asked)."""
    from ..reasoning import reasoning_of
    from .batching import read_jsonl
    from .objectives.grpo import split_row

    out = []
    for lineno, row in enumerate(read_jsonl(path), 1):
        try:
            messages, ref, tools = split_row(row)
        except EdgetuneError:  # a text row: nothing to prompt with
            continue
        if not messages or messages[-1].get("role") == "assistant" or (need_reference and ref is None):
            continue
        reasoning = None
        if "messages" in row:
            last = row["messages"][len(messages)] if len(row["messages"]) > len(messages) else {}
            reasoning = reasoning_of(last)
        thinking = row.get("enable_thinking")
        out.append(PromptRow(lineno, messages, ref, tools, thinking if isinstance(thinking, bool) else None, reasoning))
        if len(out) >= limit:
            break
    return out


def schema_for(rows: list[PromptRow]) -> dict | None:
    """json_schema's schema: inferred from the references (None unless all are JSON objects)."""
    from ..eval.metrics import infer_schema, parse_json

    parsed = [parse_json(r.reference or "") for r in rows]
    return infer_schema([o for _, o in parsed]) if parsed and all(ok for ok, _ in parsed) else None


def check(cfg, data_dir) -> None:
    """``select_by``'s data, before any model loads: a valid split with prompts and references."""
    if not cfg.select_by:
        return
    from .batching import check_data_dir

    splits = check_data_dir(data_dir)
    if "valid" not in splits:
        raise EdgetuneError(f"train.select_by = {cfg.select_by!r} scores answers to the valid split, and "
                            f"{data_dir} has no valid.jsonl.", where=str(data_dir),
                            fix="prepare the data with a validation share (`edgetune data prepare --valid-ratio 0.1`); "
                                "or train without select_by")
    rows = prompt_rows(splits["valid"], cfg.select_by_limit, need_reference=True)
    if not rows:
        raise EdgetuneError(f"train.select_by = {cfg.select_by!r}: no row of the valid split has a prompt and a "
                            "reference answer.", where=str(splits["valid"]),
                            fix="use chat, instruction or prompt/completion rows, or drop --select-by")
    if cfg.select_by == "json_schema" and schema_for(rows) is None:
        raise EdgetuneError("train.select_by = 'json_schema' checks answers against a schema inferred from the "
                            "references, and the valid split's references are not all JSON objects.",
                            where=str(splits["valid"]), fix="use --select-by json_valid or json_fields")


@dataclass
class SamplePrompt:
    row: PromptRow
    text: str  # the rendered prompt
    ids: list[int]


class Answers:
    """Greedy answers from the model being trained (``backend.generate``)."""

    def __init__(self, backend, tokenizer, model_dir, max_seq_len: int | None):
        from ..data.template import end_token_ids
        from ..reasoning import probe_tokenizer

        self.backend, self.tok, self.max_seq_len = backend, tokenizer, max_seq_len
        self.stop = end_token_ids(model_dir, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop[0]
        self.thinking = probe_tokenizer(tokenizer)

    def encode(self, rows: list[PromptRow]) -> list[SamplePrompt]:
        """The rows' prompts as training renders them; prompts longer than max_seq_len are dropped."""
        from ..data.template import render_prompt

        out = []
        for r in rows:
            text = render_prompt(self.tok, r.messages, add_generation_prompt=True, tools=r.tools, thinking=r.thinking)
            ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
            if self.max_seq_len is None or len(ids) <= self.max_seq_len:
                out.append(SamplePrompt(r, text, ids))
        return out

    def generate(self, items: list[SamplePrompt], max_new_tokens: int, note=None) -> list[str]:
        """Decoded greedy answers (cut at the end of the turn), ``note(done, total)`` after each chunk."""
        stop = set(self.stop)
        texts: list[str] = []
        for i in range(0, len(items), CHUNK):
            chunk = items[i : i + CHUNK]
            outs = self.backend.generate([e.ids for e in chunk], n=1, max_new_tokens=max_new_tokens, temperature=0.0,
                                         top_p=1.0, stop_ids=self.stop, pad_id=self.pad, seed=0)
            for o in outs:
                end = next((k for k, t in enumerate(o) if t in stop), len(o))
                texts.append(self.tok.decode(list(o[:end]), skip_special_tokens=True))
            if note is not None:
                note(len(texts), len(items))
        return texts

    def final_answer(self, output: str, prompt_text: str) -> str:
        """``output`` without a thinking template's reasoning (what eval's metrics score)."""
        if not self.thinking.any:
            return output
        from ..reasoning import split

        return split(output, self.thinking, started=prompt_text.rstrip().endswith(self.thinking.open))[1]


def _clip(text: str, n: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


class Sampler:
    """``sample_every``: answers to a few fixed prompts into ``OUT/samples.jsonl``."""

    def __init__(self, answers: Answers, splits: dict, cfg, out_dir: Path, resume_step: int | None, main: bool):
        from ..io import write_jsonl
        from .batching import read_jsonl

        self.answers, self.cfg, self.main = answers, cfg, main
        self.path = Path(out_dir) / "samples.jsonl"
        self.split = "valid" if "valid" in splits else "train"
        self.items = answers.encode(prompt_rows(splits[self.split], cfg.sample_prompts))
        self.rows: list[dict] = []
        if main and self.path.exists():  # a resumed run keeps the samples up to its checkpoint
            if resume_step is not None:
                self.rows = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
                write_jsonl(self.path, self.rows)
            else:
                self.path.unlink()

    def due(self, step: int, last: bool) -> bool:
        """Every ``sample_every`` steps and at the run's last step (early stopping included)."""
        every = self.cfg.sample_every
        return bool(self.items) and bool(every) and (step % every == 0 or last)

    def run(self, step: int, note=None) -> list[dict]:
        from ..io import write_jsonl

        outs = self.answers.generate(self.items, self.cfg.sample_max_tokens, note)
        new = [{"step": step, "row": e.row.row, "prompt": e.row.prompt, "output": o, "reference": e.row.reference}
               for e, o in zip(self.items, outs, strict=True)]
        self.rows += new
        if self.main:
            write_jsonl(self.path, self.rows)
        return new

    @staticmethod
    def describe(sample: dict) -> str:
        from rich.markup import escape

        return (f"[dim]sample @ step {sample['step']}:[/] {escape(_clip(sample['prompt'], 60))} [dim]->[/] "
                f"{escape(_clip(sample['output'], 100)) or '[dim](empty)[/]'}")


class Selector:
    """``select_by``: the mean of a task metric over greedy answers to the first valid rows."""

    def __init__(self, answers: Answers, splits: dict, cfg):
        from ..eval.metrics import DIRECTION

        self.answers, self.metric = answers, cfg.select_by
        rows = prompt_rows(splits["valid"], cfg.select_by_limit, need_reference=True)
        self.items = answers.encode(rows)
        if not self.items:
            raise EdgetuneError(f"train.select_by = {self.metric!r}: every valid prompt is longer than max_seq_len "
                                f"({answers.max_seq_len}).", where=str(splits["valid"]),
                                fix="raise --max-seq-len, or drop --select-by")
        self.schema = schema_for([e.row for e in self.items]) if self.metric == "json_schema" else None
        longest = max(len(answers.tok((e.row.reasoning or "") + (e.row.reference or ""), add_special_tokens=False)
                          ["input_ids"]) for e in self.items)
        self.max_new_tokens = min(SELECT_CAP, longest + SELECT_SLACK)
        self.direction = DIRECTION.get(self.metric, 1)  # +1 higher is better, -1 lower

    def score(self, note=None) -> float:
        from ..eval.metrics import score_example

        outs = self.answers.generate(self.items, self.max_new_tokens, note)
        vals = []
        for e, o in zip(self.items, outs, strict=True):
            answer = self.answers.final_answer(o, e.text)
            vals.append(score_example(answer, e.row.reference or "", [self.metric], schema=self.schema)
                        .get(self.metric, 0.0))
        return sum(vals) / len(vals)
