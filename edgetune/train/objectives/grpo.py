"""GRPO: reinforcement learning from rewards you define (``--objective grpo --reward json_fields``).

Each step: the step's prompts (``grad_accum`` batches of ``batch_size``) each get ``num_generations``
completions sampled from the current policy (``temperature``, ``top_p``, ``max_completion_length``
new tokens, stopping at the end of the turn); the rewards (``train/rewards.py``: built-ins named like
the eval metrics, or your function) score them; advantages are the rewards normalised within each
prompt's group (``scale_rewards``: ``group`` divides by the group's std, ``batch`` by the step's,
``none`` is Dr.GRPO's unscaled variant); the loss is the clipped-ratio policy loss plus ``beta`` times
the k3 KL estimate to the reference (the adapter-disabled model; ``beta = 0``: no reference pass),
weighted by the ratio as TRL's ``use_bias_correction_kl`` default does.

With ``num_iterations`` > 1 the same completions are reused for that many steps (the ratio is taken
against their log-probs at sampling time); with 1 the ratio is 1 and only its gradient matters.

``loss_type`` chooses how token losses are averaged, as in TRL's GRPOTrainer: ``grpo`` (mean over
each completion's tokens, then over completions), ``bnpo``/``dapo`` (over all completion tokens of
the step), ``dr_grpo`` (token sum / (completions x max_completion_length)). The loss unit the loop
averages over is the completion (grpo), the completion token (bnpo, dapo) or a completion token slot
(dr_grpo).

Prompts come from any prepared split: chat rows (the conversation before the last assistant turn is
the prompt, that turn the reference handed to rewards: its text, or its ``tool_calls`` as JSON),
prompt/completion rows and preference rows (the chosen answer is the reference). Validation samples
one greedy completion per valid prompt; the mean total reward (``val_reward``) picks the best
checkpoint and drives early stopping.

Logged per step: ``reward`` and each reward's mean and std, ``kl`` (when ``beta`` > 0),
``clip_fraction`` (tokens whose ratio was clipped), ``completion_length``, ``groups_all_equal``
(prompts whose completions all scored the same: they teach nothing). Throughput counts sampled plus
trained tokens. A resumed run samples fresh completions for the cycle it resumes in.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import EdgetuneError
from .. import batching
from . import Objective, Param

if TYPE_CHECKING:  # numpy is imported where rollouts are built, not when edgetune.config reads this table
    import numpy as np

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")


@dataclass
class PromptExample:
    ids: list[int]  # the rendered prompt, ending with the assistant's generation prompt
    prompt: str  # what rewards see as the prompt: the last user turn's text
    reference: str | None  # the reference answer (None: the row has none)

    @property
    def n_target(self) -> int:
        return 1


@dataclass
class PromptBatch:
    examples: list[PromptExample]
    n_tokens: int
    n_target: int

    @property
    def n_slots(self) -> int:
        return self.n_tokens


@dataclass
class RolloutBatch:
    """B prompts x G completions as padded rows (prompt + completion), completion tokens scored."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    advantages: np.ndarray  # [rows] float32
    n_tokens: int  # sampled + trained tokens (throughput)
    n_target: int  # loss units (see loss_type)
    old_logps: np.ndarray | None = None  # [rows, L] at sampling time (num_iterations > 1)
    ref_logps: np.ndarray | None = None  # [rows, L] adapter disabled (beta > 0)
    n_sampled: int = 0  # of n_tokens, the sampled completion tokens (not sampled again when reused)
    stats: dict = field(default_factory=dict)


def _reference_of(turn: dict) -> str | None:
    if turn.get("tool_calls"):
        return json.dumps(turn["tool_calls"], ensure_ascii=False)
    content = turn.get("content")
    return content if isinstance(content, str) else None


def split_row(row: dict) -> tuple[list[dict], str | None, object]:
    """(prompt messages, reference text, tools) of one prepared row; raises for rows with no prompt."""
    if "messages" in row:
        msgs = row["messages"]
        last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
        if last is None:
            return list(msgs), None, row.get("tools")
        return list(msgs[:last]), _reference_of(msgs[last]), row.get("tools")
    if "prompt" in row:
        p = row["prompt"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        ref = row.get("completion", row.get("chosen"))
        if isinstance(ref, list):  # chosen as messages
            ref = _reference_of(ref[-1]) if ref else None
        return prompt, ref, row.get("tools")
    raise EdgetuneError("GRPO samples answers to prompts; a text row has no prompt.",
                        fix="use chat, instruction or prompt/completion rows (edgetune data prepare)")


def _last_user(messages: list[dict]) -> str:
    users = [m.get("content") or "" for m in messages if m.get("role") == "user"]
    return users[-1] if users else ""


def encode_prompts(path: Path, tokenizer, max_seq_len: int | None) -> tuple[list[PromptExample], int]:
    """The prompts of a prepared split, rendered with the generation prompt; longer than
    ``max_seq_len`` tokens: dropped (counted)."""
    from ...data.template import render_prompt

    out, dropped = [], 0
    for lineno, row in enumerate(batching.read_jsonl(path), 1):
        try:
            messages, ref, tools = split_row(row)
            if not messages:
                raise EdgetuneError("The row has no turn before its answer to use as the prompt.")
            text = render_prompt(tokenizer, messages, add_generation_prompt=True, tools=tools)
        except EdgetuneError as exc:
            if not exc.where:
                exc.where = f"{path}:{lineno}"
            raise
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if max_seq_len is not None and len(ids) > max_seq_len:
            dropped += 1
            continue
        out.append(PromptExample(ids, _last_user(messages), ref))
    return out, dropped


def plan_prompts(examples, *, batch_size, max_seq_len, packing, group_by_length, pad_id, seed, epoch, shuffle=True):
    """One epoch of prompt batches (a pure function of its arguments, like every plan)."""
    order = list(examples)
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return [PromptBatch(g, sum(len(e.ids) for e in g), len(g))
            for g in (order[i : i + batch_size] for i in range(0, len(order), batch_size)) if g]


# --- the loss ---------------------------------------------------------------------------------------


def unit_weights(ones_like, n_tokens, loss_type: str, max_completion_length: int):
    """Per completion, how many loss units it counts for (see the module docstring), from its token
    counts (any array kind: ``ones_like`` is that kind's)."""
    if loss_type == "grpo":
        return ones_like(n_tokens)
    if loss_type == "dr_grpo":
        return ones_like(n_tokens) * float(max_completion_length)
    return n_tokens  # bnpo / dapo: its tokens


def loss(kit, model, arrays, *, beta: float = 0.0, epsilon: float = 0.2, loss_type: str = "dapo",
         max_completion_length: int = 128):
    """The clipped-ratio policy loss (+ beta x k3 KL to the reference) summed over the batch's loss
    units; metrics (kl, clip_fraction) summed over the same units."""
    beta = beta or 0.0
    logp, mask = kit.token_logps(model, arrays)  # [rows, L]; 0 where not scored
    old = arrays.get("old_logps")
    old = kit.stop_gradient(logp) if old is None else old
    adv = arrays["advantages"][:, None]
    ratio = kit.exp(logp - old)
    clipped = kit.clip(ratio, 1.0 - epsilon, 1.0 + epsilon)
    per_tok = -kit.minimum(ratio * adv, clipped * adv)
    kl = None
    if beta:
        d = arrays["ref_logps"] - logp
        kl = kit.exp(d) - d - 1.0
        # importance-weighted by the ratio (the completions came from the sampling-time policy), as TRL's
        # use_bias_correction_kl (its default): the same value at num_iterations 1, not the same gradient
        per_tok = per_tok + beta * kl * ratio
    n_tok = kit.maximum(mask.sum(axis=-1), 1.0)
    seq_sum = (per_tok * mask).sum(axis=-1)
    # grpo: each completion's token mean; the others: token sums (the loop divides by the step's units)
    total = (seq_sum / n_tok).sum() if loss_type == "grpo" else seq_sum.sum()
    w = kit.stop_gradient(unit_weights(kit.ones_like, mask.sum(axis=-1), loss_type, max_completion_length))
    sg = kit.stop_gradient
    is_clipped = kit.to_float(((ratio < 1.0 - epsilon) & (adv < 0)) | ((ratio > 1.0 + epsilon) & (adv > 0)))
    metrics = {"clip_fraction": (w * sg((is_clipped * mask).sum(axis=-1) / n_tok)).sum()}
    if kl is not None:
        metrics["kl"] = (w * sg((kl * mask).sum(axis=-1) / n_tok)).sum()
    return total, metrics


# --- sampling and scoring (the session the loop drives) -----------------------------------------------


def group_advantages(rewards: np.ndarray, group: int, scale: str) -> np.ndarray:
    """Rewards minus their group's mean, divided by the group's std (``group``), the step's (``batch``)
    or nothing (``none``), + 1e-4 as TRL; std with Bessel's correction (TRL's nanstd)."""
    import numpy as np

    g = rewards.reshape(-1, group)
    adv = (g - g.mean(axis=1, keepdims=True)).reshape(-1)
    if scale == "group":
        std = np.repeat(g.std(axis=1, ddof=1), group)
        adv = adv / (std + 1e-4)
    elif scale == "batch":
        adv = adv / ((rewards.std(ddof=1) if rewards.size > 1 else 0.0) + 1e-4)
    return np.nan_to_num(adv).astype(np.float32)


class Session:
    """What GRPO adds to the loop: completions sampled before each step, validation by reward."""

    def __init__(self, backend, tokenizer, cfg, model_dir=None):
        from .. import rewards as R

        self.backend, self.tok, self.cfg = backend, tokenizer, cfg
        self.rewards = R.parse_rewards(cfg.rewards)
        from ...data.template import end_token_ids

        self.stop = end_token_ids(model_dir, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop[0]
        self.cache: tuple[list, dict] | None = None

    def _sample(self, batch: PromptBatch, n: int, greedy: bool, seed: int) -> list[list[int]]:
        c = self.cfg
        outs = self.backend.generate([e.ids for e in batch.examples], n=n, max_new_tokens=c.max_completion_length,
                                     temperature=0.0 if greedy else c.temperature, top_p=c.top_p, stop_ids=self.stop,
                                     pad_id=self.pad, seed=seed)
        stop = set(self.stop)
        cut = []
        for o in outs:
            end = next((i + 1 for i, t in enumerate(o) if t in stop), len(o))
            cut.append(list(o[:end]) or [self.stop[0]])
        return cut

    def _score(self, batch: PromptBatch, comps: list[list[int]], n: int):
        from .. import rewards as R

        texts = [self.tok.decode([t for t in c if t not in self.stop], skip_special_tokens=True) for c in comps]
        prompts = [e.prompt for e in batch.examples for _ in range(n)]
        refs = [e.reference for e in batch.examples for _ in range(n)]
        return R.score(self.rewards, prompts, texts, refs)

    def rollout(self, batch: PromptBatch, step: int) -> RolloutBatch:
        import numpy as np

        c, G = self.cfg, self.cfg.num_generations
        comps = self._sample(batch, G, greedy=False, seed=c.seed * 1_000_003 + step)
        total, per = self._score(batch, comps, G)
        adv = group_advantages(total, G, c.scale_rewards)
        rows = [[batching.TokenizedExample(e.ids + comp, [0] * len(e.ids) + [1] * len(comp))]
                for e, comp in zip((e for e in batch.examples for _ in range(G)), comps, strict=True)]
        b = batching._collate(rows, self.pad)
        lengths = np.array([len(x) for x in comps], dtype=np.int64)
        units = int(unit_weights(np.ones_like, lengths, c.loss_type, c.max_completion_length).sum())
        n_comp = int(lengths.sum())
        rb = RolloutBatch(b.input_ids, b.labels, b.position_ids, adv, n_tokens=b.n_tokens + n_comp, n_target=units,
                          n_sampled=n_comp)
        if c.num_iterations > 1:
            rb.old_logps = self.backend.token_logps(rb, reference=False)
        if c.beta:
            rb.ref_logps = self.backend.token_logps(rb, reference=True)
        g = total.reshape(-1, G)
        rb.stats = {"sum": {"reward": float(total.sum()), **{f"reward_{k}": float(v.sum()) for k, v in per.items()},
                            "completion_length": float(n_comp)},
                    "values": {"reward": total, **{f"reward_{k}": v for k, v in per.items()}},
                    "n": len(comps), "groups_all_equal": int((g.max(axis=1) == g.min(axis=1)).sum()),
                    "groups": g.shape[0]}
        return rb

    def batches(self, data, n: int, step: int) -> tuple[list, dict]:
        """This step's rollout batches (fresh every ``num_iterations`` steps) and the reward metrics."""
        import numpy as np

        if self.cache is None or step % self.cfg.num_iterations == 0:
            mbs = [self.rollout(b, step * n + i) for i, b in enumerate(data.take(n))]
            values: dict[str, list] = {}
            for b in mbs:
                for k, v in b.stats["values"].items():
                    values.setdefault(k, []).append(v)
            count = sum(b.stats["n"] for b in mbs)
            metrics = {}
            for k, vs in values.items():
                allv = np.concatenate(vs)
                metrics[k] = float(allv.mean())
                metrics[f"{k}_std"] = float(allv.std(ddof=1)) if allv.size > 1 else 0.0
            metrics["completion_length"] = sum(b.stats["sum"]["completion_length"] for b in mbs) / max(count, 1)
            metrics["groups_all_equal"] = sum(b.stats["groups_all_equal"] for b in mbs) / max(1, sum(b.stats["groups"] for b in mbs))
            self.cache = (mbs, metrics)
            return self.cache
        mbs, metrics = self.cache  # reused (num_iterations > 1): trained again, not sampled again
        return [dataclasses.replace(b, n_tokens=b.n_tokens - b.n_sampled, n_sampled=0) for b in mbs], metrics

    def evaluate(self, batches: list[PromptBatch]) -> dict:
        """One greedy completion per valid prompt: mean total reward and each reward's mean."""
        sums: dict[str, float] = {}
        n = 0
        length = 0
        for i, b in enumerate(batches):
            comps = self._sample(b, 1, greedy=True, seed=i)
            total, per = self._score(b, comps, 1)
            sums["reward"] = sums.get("reward", 0.0) + float(total.sum())
            for k, v in per.items():
                sums[f"reward_{k}"] = sums.get(f"reward_{k}", 0.0) + float(v.sum())
            n += len(comps)
            length += sum(len(c) for c in comps)
        out = {k: v / max(n, 1) for k, v in sums.items()}
        out["completion_length"] = length / max(n, 1)
        return out


def start(backend, tokenizer, cfg, model_dir=None) -> Session:
    return Session(backend, tokenizer, cfg, model_dir)


def check(cfg, data_dir) -> None:
    """Before any model loads: the rewards parse, and every train/valid row has what they need."""
    from .. import rewards as R

    rewards = R.parse_rewards(cfg.rewards)
    for split, path in batching.check_data_dir(data_dir).items():
        if split == "test":
            continue
        refs = []
        for lineno, row in enumerate(batching.read_jsonl(path), 1):
            try:
                refs.append(split_row(row)[1])
            except EdgetuneError as exc:
                exc.where = exc.where or f"{path}:{lineno}"
                raise
        R.check_references(rewards, refs, str(path))


def _sequences(cfg) -> int:
    return cfg.num_generations


OBJECTIVE = Objective(
    "grpo",
    encode=encode_prompts,
    plan=plan_prompts,
    loss=loss,
    summary="reinforcement from rewards: sampled completions scored by --reward, group-normalised advantages",
    params=(
        Param("num_generations", 4, "GRPO: completions sampled per prompt (the group: at least 2 to compare)",
              type="int", lo=2, hi=256),
        Param("max_completion_length", 128, "GRPO: most new tokens per completion", type="int", lo=1, hi=32768),
        Param("temperature", 1.0, "GRPO: sampling temperature", lo=0.0, hi=5.0),
        Param("top_p", 1.0, "GRPO: nucleus sampling mass", lo=0.01, hi=1.0),
        Param("num_iterations", 1, "GRPO: optimizer steps per batch of completions (ratio clipped against "
              "the sampling-time policy)", type="int", lo=1, hi=64),
        Param("epsilon", 0.2, "GRPO: clip range of the probability ratio", lo=0.0, hi=10.0),
        Param("loss_type", "dapo", "GRPO: how token losses are averaged", type="str", choices=LOSS_TYPES),
        Param("scale_rewards", "group", "GRPO: advantage scaling (none = Dr.GRPO)", type="str", choices=SCALES),
        Param("rewards", None, "GRPO: a reward, NAME[=ARG][:WEIGHT] or MODULE:FUNC[:WEIGHT] (repeatable): "
              "json_valid, json_fields, exact, regex=PATTERN, number[=TOL], tool_call, length[=N]",
              type="list[str] | None", multiple=True),
    ),
    uses=("beta", "epsilon", "loss_type", "max_completion_length"),
    sequences=_sequences,
    extra_tokens=lambda cfg: cfg.max_completion_length,
    reference_pass=lambda cfg: bool(cfg.beta),
    packable=False,
    monitor="reward",
    maximize=True,
    loss_spikes=False,  # advantages are centred per group: the policy loss hovers around 0
    start=start,
    check=check,
    defaults={"beta": 0.0},  # TRL GRPOConfig.beta: no KL term, no reference pass
)
