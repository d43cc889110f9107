"""The one runner interface: chat messages in → text, token counts and timing out.

A runner may also score references teacher-forced (:meth:`Runner.score`, for NLL/perplexity)
and expose next-token logits for a given token sequence (:meth:`Runner.logits`, for drift).
Runners that cannot (HTTP APIs) leave ``supports_logits = False``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ...errors import EdgetuneError, UnsupportedError


@dataclass
class GenParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    think: bool | None = None  # a thinking template's switch (enable_thinking / Ollama's think); None = its default


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None  # time to the first generated token (prefill included)
    total_s: float
    finish_reason: str = "stop"  # stop | length
    batch: int = 1  # conversations generated together; ttft_s and total_s are the batch's
    tool_calls: list[dict] | None = None  # [{"name", "arguments"}] the model called (tools offered only)
    tool_error: str | None = None  # why a call the model started is malformed
    reasoning: str | None = None  # a thinking model's reasoning, apart from the answer (``text``)

    @property
    def tokens_per_s(self) -> float | None:
        if self.ttft_s is None or self.completion_tokens < 2 or self.total_s <= self.ttft_s:
            return None
        return (self.completion_tokens - 1) / (self.total_s - self.ttft_s)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        return d


class Runner:
    """Base class; subclasses implement :meth:`generate` and, when they can, the logit methods."""

    # the runner table (edgetune.eval.runners.runner_table) is read from these class attributes
    kind = "base"  # the SPEC prefix (``kind:target``)
    spec = ""  # the SPEC grammar after [NAME=], for the docs
    supports_logits = False  # next-token logits: NLL, drift, preference accuracy
    local = False  # the target is a local path (its file or folder name labels the model)
    label_prefix = ""  # prepended to that label (``mlx:``), so two runners of one folder differ
    batch_size = 1  # conversations per generate_batch call when eval.batch_size is auto
    vocab_size: int | None = None  # width of the logits, where the runner knows it (sizes drift's chunks)

    def __init__(self, spec: str):
        self.spec = spec

    @property
    def thinking(self):
        """What the runner's chat template does with reasoning (:class:`edgetune.reasoning.Thinking`);
        None when the runner cannot tell (an HTTP server renders the template itself)."""
        return None

    # -- generation
    def generate(self, messages: list[dict], params: GenParams, tools: list[dict] | None = None) -> Generation:  # pragma: no cover
        """One answer; with ``tools`` (OpenAI function schemas) the model may call them and the
        Generation carries its calls (``tool_calls``, ``tool_error``)."""
        raise NotImplementedError

    def generate_batch(self, batch: list[list[dict]], params: GenParams,
                       tools: list[list[dict] | None] | None = None) -> list[Generation]:
        """Several conversations (``tools``: one list per conversation); runtimes that batch (hf) override this."""
        return [self.generate(m, params, tools=tools[i] if tools else None) for i, m in enumerate(batch)]

    # -- teacher forcing
    def encode(self, messages: list[dict], reference: str) -> tuple[list[int], int]:
        """Token ids of prompt + reference answer (with the template's end-of-turn), and the
        number of prompt tokens; the positions after it are the reference tokens."""
        raise UnsupportedError(f"The {self.kind} runner cannot score references (no logits).")

    def logits(self, ids: list[int]) -> np.ndarray:
        """Next-token logits [len(ids), vocab] (float32) for the sequence ``ids``."""
        raise UnsupportedError(f"The {self.kind} runner does not expose logits.")

    def logits_many(self, seqs: list[tuple[list[int], slice]]) -> list[np.ndarray]:
        """Logits of several sequences, each at its ``slice`` of positions; runners that can do
        better than one call per sequence (hf: one streamed pass) override it."""
        return [self.logits(ids)[keep] for ids, keep in seqs]

    def score(self, messages: list[dict], reference: str) -> tuple[float, int]:
        """Sum of the reference tokens' negative log-likelihood and their count."""
        ids, n_prompt = self.encode(messages, reference)
        if len(ids) <= n_prompt:
            return 0.0, 0
        lg = self.logits(ids).astype(np.float64)
        # position t predicts token t+1
        pred = lg[n_prompt - 1 : len(ids) - 1]
        targets = np.asarray(ids[n_prompt:])
        m = pred.max(-1, keepdims=True)
        logz = (m + np.log(np.exp(pred - m).sum(-1, keepdims=True)))[:, 0]
        nll = logz - pred[np.arange(len(targets)), targets]
        return float(nll.sum()), len(targets)

    def info(self) -> dict:
        return {"kind": self.kind, "spec": self.spec}

    def close(self) -> None:
        pass


def with_reasoning(gen: Generation, thinking, prompt: str) -> Generation:
    """``gen`` with a thinking template's reasoning split from its answer (the prompt tells whether
    the block was already opened for the model)."""
    if thinking is None or not thinking.any:
        return gen
    from ...reasoning import split

    gen.reasoning, gen.text = split(gen.text, thinking, started=prompt.rstrip().endswith(thinking.open))
    return gen


def with_tool_calls(gen: Generation, template: str | None, tools: list[dict] | None) -> Generation:
    """``gen`` with the calls parsed from its text by the template's call syntax (tools offered only)."""
    if not tools:
        return gen
    from ...toolcalls import parse_calls, syntax_for

    parsed = parse_calls(gen.text, syntax_for(template), tools)
    gen.tool_calls, gen.tool_error = parsed.calls, parsed.error
    return gen


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Truncate ``text`` at the first stop string; returns (text, stopped)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class Timer:
    """Wall clock for one generation: ``first()`` marks the first token."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.t_first: float | None = None

    def first(self) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def split_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """A conversation ending with an assistant turn → (prompt messages, reference text)."""
    if not messages or messages[-1].get("role") != "assistant":
        raise EdgetuneError("An eval example must end with an assistant turn (the reference answer).")
    return messages[:-1], str(messages[-1].get("content") or "")


def prefix_and_full(render, messages: list[dict], reference: str) -> tuple[str, str]:
    """Prompt text (with generation prompt) and full text (prompt + reference + end-of-turn).

    Trailing whitespace after the end-of-turn token (ChatML's newline) is dropped: it is the
    template's separator before a next turn, not something the model is asked to produce.
    """
    prompt = render(messages, True)
    full = render(messages + [{"role": "assistant", "content": reference}], False).rstrip()
    if not full.startswith(prompt):
        full = prompt + reference
    return prompt, full


def join_ids(tokenize, prompt: str, full: str) -> tuple[list[int], int]:
    """Token ids of ``full`` and how many of them are the prompt; tokenizes the prompt and the
    rest separately when tokenizing ``full`` whole would merge a token across the seam."""
    p_ids = tokenize(prompt, True)
    f_ids = tokenize(full, True)
    if f_ids[: len(p_ids)] == p_ids:
        return f_ids, len(p_ids)
    return p_ids + tokenize(full[len(prompt):], False), len(p_ids)


def safe_exp(x: float) -> float:
    return math.exp(min(x, 50.0))


def _info_value(v: Any) -> Any:
    return str(v) if v is not None else None
