"""mlx-lm runner (Apple Silicon, or Linux CPU with ``mlx[cpu]``), optional mlx-lm LoRA adapter.

Uses ``mlx_lm.load(path, adapter_path=...)`` and ``mlx_lm.stream_generate`` with mlx-lm's own
sampler; the prompt is rendered by the shared :func:`edgetune.data.template.render_prompt` on the
HF tokenizer mlx-lm wraps, so it matches training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import EdgetuneError, MissingDependencyError
from .base import (
    Generation,
    GenParams,
    Runner,
    Timer,
    cut_at_stop,
    join_ids,
    prefix_and_full,
    with_reasoning,
    with_tool_calls,
)


class MLXRunner(Runner):
    kind = "mlx"
    spec = "mlx:MODEL_DIR[+adapter:MLX_ADAPTER_DIR]"
    local = True
    label_prefix = "mlx:"
    supports_logits = True

    def __init__(self, target: str, adapter: str | None = None, chat_template: str | None = None):
        super().__init__(f"mlx:{target}")
        try:
            import mlx.core as mx  # noqa: F401
            import mlx_lm
        except ImportError:
            raise MissingDependencyError("mlx-lm", "mlx", "The mlx runner") from None
        self.path = Path(target).expanduser()
        from ...arch import read_config

        read_config(self.path)  # the one error for a folder without config.json
        self.adapter = Path(adapter).expanduser() if adapter else None
        if self.adapter and not (self.adapter / "adapter_config.json").is_file():
            raise EdgetuneError(f"Not an mlx-lm adapter folder (no adapter_config.json): {self.adapter}",
                                where=str(self.adapter), fix="pass the adapter folder written by mlx-lm / edgetune train --backend mlx")
        self.model, self.tok = mlx_lm.load(str(self.path), adapter_path=str(self.adapter) if self.adapter else None)
        self.hf_tok = getattr(self.tok, "_tokenizer", self.tok)
        if chat_template:
            from ...data.template import resolve_chat_template

            self.hf_tok.chat_template = resolve_chat_template(chat_template)
        self.eos_ids = set(getattr(self.tok, "eos_token_ids", None) or [self.hf_tok.eos_token_id])

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               think: bool | None = None) -> str:
        from ...data.template import render_prompt
        from ...toolcalls import prepare_messages

        if tools:
            messages = prepare_messages(messages)
        return render_prompt(self.hf_tok, messages, add_generation_prompt=add_generation_prompt, tools=tools, thinking=think)

    @property
    def thinking(self):
        from ...reasoning import probe_tokenizer

        return probe_tokenizer(self.hf_tok)

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return self.hf_tok(text, add_special_tokens=False)["input_ids"]

    def generate(self, messages: list[dict], params: GenParams, tools: list[dict] | None = None) -> Generation:
        import mlx.core as mx
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        timer = Timer()
        prompt = self.render(messages, True, tools, params.think)
        ids = self.tokenize(prompt)
        if params.temperature > 0:
            mx.random.seed(params.seed)
        sampler = make_sampler(temp=params.temperature, top_p=params.top_p if params.temperature > 0 else 0.0,
                               top_k=params.top_k)
        text, n, finish = "", 0, "length"
        for resp in stream_generate(self.model, self.tok, ids, max_tokens=params.max_tokens, sampler=sampler):
            timer.first()
            n = resp.generation_tokens
            if resp.token in self.eos_ids:
                finish = "stop"
                break
            text += resp.text
            if params.stop:
                text, hit = cut_at_stop(text, params.stop)
                if hit:
                    finish = "stop"
                    break
            if resp.finish_reason:
                finish = resp.finish_reason
        gen = Generation(text, len(ids), n, timer.ttft, timer.elapsed(), "stop" if finish == "stop" else "length")
        return with_tool_calls(with_reasoning(gen, self.thinking, prompt), self.hf_tok.chat_template, tools)

    def encode(self, messages: list[dict], reference: str) -> tuple[list[int], int]:
        prompt, full = prefix_and_full(self.render, messages, reference)
        return join_ids(self.tokenize, prompt, full)

    def logits(self, ids: list[int]) -> np.ndarray:
        import mlx.core as mx

        out = self.model(mx.array([ids]))[0].astype(mx.float32)
        return np.array(out)

    def info(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "path": str(self.path),
                "adapter": str(self.adapter) if self.adapter else None}

    def close(self) -> None:
        self.model = None
