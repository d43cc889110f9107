"""transformers runner, with an optional PEFT adapter (``hf:BASE+adapter:ADAPTER_DIR``).

Prompts go through :func:`edgetune.data.template.render_prompt`, the same rendering training
uses, so the model is evaluated on exactly the prompt format it was tuned on.
"""

from __future__ import annotations

import os
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

DTYPES = ("float32", "bfloat16", "float16", "auto")


class HFRunner(Runner):
    kind = "hf"
    spec = "hf:MODEL_DIR[+adapter:PEFT_ADAPTER_DIR]"
    local = True
    supports_logits = True

    def __init__(self, target: str, adapter: str | None = None, dtype: str = "auto", device: str | None = None,
                 chat_template: str | None = None, num_threads: int | None = None):
        super().__init__(f"hf:{target}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import torch
        except ImportError:
            raise MissingDependencyError("torch", "torch", "The hf runner") from None
        from ...data.template import load_tokenizer

        self.path = Path(target).expanduser()
        from ...arch import read_config

        read_config(self.path)  # the one error for a folder without config.json
        if dtype not in DTYPES:
            raise EdgetuneError(f"eval dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
        if num_threads:
            torch.set_num_threads(num_threads)
        self.torch = torch
        self.tokenizer = load_tokenizer(self.path, chat_template)
        from ...precision import decide

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # the dtype and generation batch come from the one precision policy: on a CPU without
        # fast bf16, the checkpoint's own bf16 makes every prefill ~100x slower than fp32
        self.decision = decide("generate", self.device, dtype)
        self.batch_size = self.decision.batch_size or 1
        self.adapter = None
        if adapter:
            self.adapter = Path(adapter).expanduser()
            if not (self.adapter / "adapter_config.json").is_file():
                raise EdgetuneError(f"Not a PEFT adapter folder (no adapter_config.json): {self.adapter}",
                                    where=str(self.adapter), fix="pass the adapter/ folder written by edgetune train")
        self._model = None  # loaded on first generation or single-sequence logits: drift streams instead
        self._streamed = None
        from ...data.template import end_token_ids
        from ...train.memory import _model_shapes

        self.vocab_size = _model_shapes(self.path)["vocab"]
        self.eos_ids = end_token_ids(self.path, self.tokenizer)

    @property
    def model(self):
        if self._model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(self.path), dtype=self.decision.torch_dtype,
                                                         local_files_only=True)
            if self.adapter:
                try:
                    from peft import PeftModel
                except ImportError:
                    raise MissingDependencyError("peft", "torch", "Evaluating a PEFT adapter") from None
                model = PeftModel.from_pretrained(model, str(self.adapter))
            self._model = model.to(self.device).eval()
        return self._model

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               think: bool | None = None) -> str:
        from ...data.template import render_prompt
        from ...toolcalls import prepare_messages

        if tools:
            messages = prepare_messages(messages)
        return render_prompt(self.tokenizer, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                             thinking=think)

    @property
    def thinking(self):
        from ...reasoning import probe_tokenizer

        return probe_tokenizer(self.tokenizer)

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        # the rendered template already holds every special token the model expects
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, messages: list[dict], params: GenParams, tools: list[dict] | None = None) -> Generation:
        return self.generate_batch([messages], params, tools=[tools] if tools else None)[0]

    def left_pad(self, prompts: list[list[int]]):
        """(input ids, attention mask, pad id) of prompts left-padded to the longest."""
        torch = self.torch
        width = max(len(p) for p in prompts)
        pad = self.eos_ids[0] if self.tokenizer.pad_token_id is None else self.tokenizer.pad_token_id
        inp = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        return inp, mask, pad

    def generate_batch(self, batch: list[list[dict]], params: GenParams,
                       tools: list[list[dict] | None] | None = None) -> list[Generation]:
        """Greedy/sampled generation for several conversations at once (left-padded).

        With more than one conversation the timing is the batch's: every row reports the batch's
        time to first token and total time (what a caller waiting on the batch experiences).
        """
        from transformers import StoppingCriteria, StoppingCriteriaList

        torch = self.torch
        timer = Timer()

        class _FirstToken(StoppingCriteria):
            # called once per generated token: the first call is the time to first token
            def __call__(self, input_ids, scores, **kwargs):
                timer.first()
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        tools = tools or [None] * len(batch)
        texts = [self.render(m, True, t, params.think) for m, t in zip(batch, tools, strict=True)]
        prompts = [self.tokenize(t) for t in texts]
        inp, mask, pad = self.left_pad(prompts)
        width = inp.shape[1]
        kw = dict(max_new_tokens=params.max_tokens, do_sample=params.temperature > 0, pad_token_id=pad,
                  eos_token_id=self.eos_ids, stopping_criteria=StoppingCriteriaList([_FirstToken()]))
        if params.temperature > 0:
            torch.manual_seed(params.seed)
            kw.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        if params.stop:
            kw.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        with torch.no_grad():
            out = self.model.generate(input_ids=inp, attention_mask=mask, **kw)
        elapsed = timer.elapsed()
        gens = []
        for row, p, row_tools, ptext in zip(out.tolist(), prompts, tools, texts, strict=True):
            new = row[width:]
            finish = "length"
            for i, t in enumerate(new):  # rows that finished early are padded after their end-of-turn
                if t in self.eos_ids:
                    new, finish = new[: i + 1], "stop"
                    break
            n_gen = len(new)
            if finish == "stop":
                new = new[:-1]
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            if params.stop:
                text, hit = cut_at_stop(text, params.stop)
                finish = "stop" if hit else finish
            gen = Generation(text, len(p), n_gen, timer.ttft, elapsed, finish, batch=len(batch))
            gens.append(with_tool_calls(with_reasoning(gen, self.thinking, ptext), self.tokenizer.chat_template, row_tools))
        return gens

    def encode(self, messages: list[dict], reference: str) -> tuple[list[int], int]:
        prompt, full = prefix_and_full(self.render, messages, reference)
        return join_ids(self.tokenize, prompt, full)

    def logits(self, ids: list[int]) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            out = self.model(torch.tensor([ids], device=self.device)).logits[0]
        return out.float().cpu().numpy()

    def logits_many(self, seqs: list[tuple[list[int], slice]]) -> list[np.ndarray]:
        """fp32 logits without loading the model: one pass streamed block by block
        (:mod:`edgetune.streaming`, the adapter merged as each weight is read). A model already
        loaded for generation, or a non-fp32 dtype, answers from memory instead."""
        if self._model is not None or self.decision.dtype != "fp32" or self.device != "cpu":
            return super().logits_many(seqs)
        from ...streaming import StreamedModel, logits

        if self._streamed is None:
            self._streamed = StreamedModel(self.path, adapter=self.adapter)
        return logits(self.path, [ids for ids, _ in seqs], keep=[keep for _, keep in seqs], model=self._streamed)

    def info(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "path": str(self.path),
                "adapter": str(self.adapter) if self.adapter else None, "dtype": self.decision.dtype,
                "dtype_reason": self.decision.reason, "batch_size": self.batch_size}

    def close(self) -> None:
        self._model = self._streamed = None
