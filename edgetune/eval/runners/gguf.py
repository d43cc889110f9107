"""llama.cpp runner (llama-cpp-python) for GGUF files, with an optional GGUF LoRA adapter.

The prompt is rendered from the chat template stored in the GGUF (what ``llama-server`` and
Ollama's converted template use), with llama.cpp's own tokenizer. Generation drives
``Llama.generate`` token by token: that gives exact token counts and the time of the first token
without a second pass, and leaves llama.cpp's sampler in charge (greedy at temperature 0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import Keys

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


class GGUFRunner(Runner):
    kind = "gguf"
    spec = "gguf:FILE.gguf[+adapter:LORA.gguf]"
    local = True
    supports_logits = True

    def __init__(self, target: str, adapter: str | None = None, n_ctx: int = 2048, n_threads: int | None = None,
                 chat_template: str | None = None):
        super().__init__(f"gguf:{target}")
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise MissingDependencyError("llama-cpp-python", "eval", "Running a GGUF") from None
        self.path = Path(target).expanduser()
        if not self.path.is_file():
            raise EdgetuneError(f"GGUF file not found: {self.path}", where=str(self.path),
                                fix="pass the path of a .gguf file (edgetune export writes them)")
        self.adapter = Path(adapter).expanduser() if adapter else None
        if self.adapter and not self.adapter.is_file():
            raise EdgetuneError(f"GGUF LoRA adapter not found: {self.adapter}", where=str(self.adapter),
                                fix="export the adapter with `edgetune export adapter --base MODEL_DIR --adapter ADAPTER_DIR -o LORA.gguf`")
        self.n_ctx = n_ctx
        self.n_threads = n_threads or 2
        # weights load on first use, by what is asked: generation (llama.cpp's defaults) or scoring
        # (logits at every position, no repacked weight copy: export/verify.py); drift never loads
        # the generation context. The vocabulary alone answers tokenizing and the chat template.
        self.vocab = self._load(logits_all=False, vocab_only=True)
        self._llm = self._scorer = None
        self.vocab_size = self.vocab.n_vocab()
        self._init_template(chat_template)

    @property
    def llm(self):
        """The generation context."""
        if self._llm is None:
            self._llm = self._load(logits_all=False)
        return self._llm

    def _load(self, logits_all: bool, vocab_only: bool = False):
        from llama_cpp import Llama

        from ...llamacpp import measure_repack, model_params, quiet

        kw = {"lora_path": str(self.adapter)} if self.adapter and not vocab_only else {}
        try:
            with model_params(measure_repack() or not logits_all), quiet(verbose=False):
                return Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_threads=self.n_threads, verbose=False,
                             logits_all=logits_all, vocab_only=vocab_only, **kw)
        except (ValueError, RuntimeError) as exc:
            raise EdgetuneError(f"llama.cpp could not load {self.path.name}: {exc}", where=str(self.path),
                                fix="check the file is a complete GGUF (re-run the export) and the adapter matches it") from None

    def _init_template(self, chat_template: str | None) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = chat_template or self.vocab.metadata.get(Keys.Tokenizer.CHAT_TEMPLATE)
        if chat_template:
            from ...data.template import resolve_chat_template

            template = resolve_chat_template(chat_template)
        if not template:
            raise EdgetuneError(f"{self.path.name} has no chat template in its metadata.", where=str(self.path),
                                fix="pass a chat template (eval --chat-template FILE|FAMILY) or re-export with one")
        m = self.vocab._model
        eos, bos = self.vocab.token_eos(), self.vocab.token_bos()
        self.eos_text = m.token_get_text(eos) if eos != -1 else ""
        bos_text = m.token_get_text(bos) if bos != -1 else ""
        self._fmt = {
            gen: Jinja2ChatFormatter(template=template, eos_token=self.eos_text, bos_token=bos_text, add_generation_prompt=gen)
            for gen in (True, False)
        }
        self.template = template
        from ...reasoning import probe_jinja

        self._thinking = probe_jinja(template, bos_text, self.eos_text)

    @property
    def thinking(self):
        return self._thinking

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               think: bool | None = None) -> str:
        kw = {} if think is None else {"enable_thinking": think}
        if tools:
            from ...toolcalls import prepare_messages

            return self._fmt[add_generation_prompt](messages=prepare_messages(messages), tools=tools, **kw).prompt
        return self._fmt[add_generation_prompt](messages=messages, **kw).prompt

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        # add_special follows the GGUF's tokenizer.ggml.add_bos_token, as llama-server does
        return self.vocab.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)

    def generate(self, messages: list[dict], params: GenParams, tools: list[dict] | None = None) -> Generation:
        from llama_cpp import llama_cpp as C

        timer = Timer()
        prompt = self.render(messages, True, tools, params.think)
        ids = self.tokenize(prompt)
        if len(ids) + 1 >= self.n_ctx:
            raise EdgetuneError(f"Prompt of {len(ids)} tokens does not fit n_ctx={self.n_ctx}.",
                                fix="raise eval n_ctx or shorten the example")
        budget = min(params.max_tokens, self.n_ctx - len(ids) - 1)
        if params.temperature > 0:
            self.llm.set_seed(params.seed)
        vocab = self.llm._model.vocab
        out: list[int] = []
        finish = "length"
        text = ""
        for tok in self.llm.generate(ids, temp=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                     min_p=0.0, repeat_penalty=1.0, reset=True):
            timer.first()
            if C.llama_vocab_is_eog(vocab, tok):
                finish = "stop"
                break
            out.append(tok)
            if params.stop:
                text = self.llm.detokenize(out).decode("utf-8", errors="ignore")
                text, hit = cut_at_stop(text, params.stop)
                if hit:
                    finish = "stop"
                    break
            if len(out) >= budget:
                break
        if not (params.stop and finish == "stop"):
            text = self.llm.detokenize(out).decode("utf-8", errors="replace")
        gen = with_reasoning(Generation(text, len(ids), len(out), timer.ttft, timer.elapsed(), finish), self._thinking, prompt)
        return with_tool_calls(gen, self.template, tools)

    # -- teacher forcing
    def encode(self, messages: list[dict], reference: str) -> tuple[list[int], int]:
        prompt, full = prefix_and_full(self.render, messages, reference)
        return join_ids(self.tokenize, prompt, full)

    def logits(self, ids: list[int]) -> np.ndarray:
        if len(ids) > self.n_ctx:
            raise EdgetuneError(f"Sequence of {len(ids)} tokens does not fit n_ctx={self.n_ctx}.", fix="raise eval n_ctx")
        if self._scorer is None:
            self._scorer = self._load(logits_all=True)
        from ...llamacpp import gguf_logits

        return gguf_logits(self._scorer, [list(ids)])[0]

    def info(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "path": str(self.path),
                "adapter": str(self.adapter) if self.adapter else None,
                "file_type": self.vocab.metadata.get(Keys.General.FILE_TYPE)}

    def close(self) -> None:
        for llm in (self.vocab, self._llm, self._scorer):
            if llm is not None:
                llm.close()
        self.vocab = self._llm = self._scorer = None
