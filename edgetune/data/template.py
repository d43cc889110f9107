"""Chat-template rendering with completion-only loss masks.

Training and evaluation both call this module, so the prompt a model is trained on is the prompt it
is evaluated with. The mask is computed from the tokenizer's *own* chat template: we render growing
prefixes of the conversation and check that each prefix is a prefix of the full rendering, which
gives the exact character span of every assistant turn (content + end-of-turn token). The full text
is then tokenized once, exactly as ``apply_chat_template(tokenize=True)`` would, and the character
offsets of each token decide whether it carries loss. Hand-written because HF's
``return_assistant_tokens_mask`` needs ``{% generation %}`` markers that almost no shipped template
has, and mlx-lm's ``mask_prompt`` only unmasks the last assistant turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..chat_families import training_templates
from ..errors import EdgetuneError, UnsupportedError

# Known chat-template families, for base models that ship without one (``--chat-template NAME``):
# the training side of the one family table (edgetune.chat_families), which also holds each
# family's Ollama TEMPLATE.
KNOWN_TEMPLATES: dict[str, str] = training_templates()


@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token carries loss, same length as input_ids

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_loss(self) -> int:
        return sum(self.loss_mask)


def resolve_chat_template(chat_template: str) -> str:
    """A template file path, a known family name or ``demo:FILE`` (shipped) -> the Jinja template text."""
    from ..recipes import demo_resource

    p = demo_resource(chat_template) or Path(chat_template).expanduser()
    if chat_template.lower() in KNOWN_TEMPLATES and not p.is_file():
        return KNOWN_TEMPLATES[chat_template.lower()]
    if p.is_file():
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".json":  # a tokenizer_config.json-like file holding "chat_template"
            import json

            try:
                text = json.loads(text)["chat_template"]
            except (ValueError, KeyError, TypeError):
                raise EdgetuneError(
                    f"{p} is JSON but has no 'chat_template' string.", where=str(p),
                    fix="pass a .jinja file or a tokenizer_config.json that has chat_template",
                ) from None
        return text
    raise EdgetuneError(
        f"Chat template {chat_template!r} is neither a file nor a known family.",
        fix=f"pass a Jinja template file or one of: {', '.join(KNOWN_TEMPLATES)}",
    )


def load_tokenizer(model_dir, chat_template: str | None = None):
    """Load the model's HF tokenizer from local files only (a model folder or a ``.gguf`` file).

    ``chat_template`` (file or family name) overrides/supplies the template. Raises
    :class:`EdgetuneError` when the model has no chat template and none is given.
    """
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    path = Path(model_dir).expanduser()
    if not path.exists():
        raise EdgetuneError(
            f"Model not found: {path}", where=str(path),
            fix="pass a local HF model folder (with tokenizer files) or a .gguf file",
        )
    try:
        if path.is_file() and path.suffix == ".gguf":
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EdgetuneError(
            f"Could not load a tokenizer from {path}: {exc}", where=str(path),
            fix="the folder needs tokenizer.json / tokenizer_config.json (as saved by save_pretrained)",
        ) from None
    if chat_template:
        tok.chat_template = resolve_chat_template(chat_template)
    if not getattr(tok, "chat_template", None):
        raise EdgetuneError(
            f"The tokenizer in {path} has no chat template.", where=str(path),
            fix=f"pass --chat-template FILE or a family name ({', '.join(KNOWN_TEMPLATES)})",
        )
    return tok


def end_token_ids(model_dir, tokenizer) -> list[int]:
    """The ids that end a generation: the tokenizer's EOS and the model's generation config's
    (chat models end a turn with their own token), as transformers derives them."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id}
    try:
        gen_eos = GenerationConfig.from_pretrained(str(model_dir), local_files_only=True).eos_token_id
    except OSError:  # no generation_config.json: the model config's, as transformers derives it
        from transformers import AutoConfig

        gen_eos = getattr(AutoConfig.from_pretrained(str(model_dir), local_files_only=True), "eos_token_id", None)
    ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(e for e in ids if e is not None)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, tools: Any = None, thinking: bool | None = None) -> str:
    kwargs = {"tools": tools} if tools else {}
    if thinking is not None:  # the template's switch (Qwen3's enable_thinking); templates without one ignore it
        kwargs["enable_thinking"] = thinking
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except Exception as exc:  # jinja raises TemplateError / raise_exception() messages
        raise EdgetuneError(
            f"The chat template could not render this conversation: {exc}",
            fix="check the roles/order the model's template accepts (e.g. some templates reject a system role)",
        ) from None
    if not isinstance(text, str):  # very old/new transformers may return a list for batched input
        text = text[0]
    return text


def render_prompt(tokenizer, messages: list[dict], add_generation_prompt: bool = True, tools: Any = None,
                  thinking: bool | None = None) -> str:
    """The exact prompt string the model sees (used by eval and the Ollama/GGUF fidelity checks);
    ``thinking``: the template's thinking switch (None = the template's default)."""
    return _render(tokenizer, messages, add_generation_prompt, tools, thinking)


def _assistant_spans(tokenizer, messages: list[dict], full: str, tools: Any, score_from: int = 0,
                     thinking: bool | None = None) -> list[tuple[int, int]]:
    """Character spans in ``full`` of each assistant turn: content + end-of-turn token.

    Turns before message index ``score_from`` are located (to keep the cursor right) but not returned.
    """
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        if i == 0:
            try:
                before = _render(tokenizer, [], True, tools, thinking)
            except EdgetuneError:
                before = ""
        else:
            before = _render(tokenizer, messages[:i], True, tools, thinking)
        upto = _render(tokenizer, messages[: i + 1], False, tools, thinking)
        if upto.startswith(before) and full.startswith(upto) and len(before) >= cursor:
            start, end = len(before), len(upto)
            # the template's separator after the end-of-turn token (ChatML's "\n") is not a target
            end = start + len(full[start:end].rstrip())
        else:
            # Prefix-inconsistent template (e.g. one that drops reasoning from earlier turns):
            # render the conversation with this turn's content replaced by a sentinel; what the
            # real rendering has between the sentinel's prefix and suffix is this turn's text.
            span = _sentinel_span(tokenizer, messages, i, full, tools, cursor, thinking)
            if span is None:
                span = _search_span(tokenizer, messages, i, full, tools, cursor, thinking)
            if span is None:
                raise EdgetuneError(
                    f"Cannot locate assistant turn {i} in the rendered chat template.",
                    fix="this template rewrites turns in a way edgetune cannot map; pass --chat-template with a prefix-stable template",
                )
            start, end = span
        if end > start and i >= score_from:
            spans.append((start, end))
        cursor = max(cursor, end)
    return spans


SENTINEL = "\u2063EDGETUNE_SPAN\u2063"


def _sentinel_span(tokenizer, messages, i, full, tools, cursor, thinking=None) -> tuple[int, int] | None:
    probe = [dict(m) for m in messages]
    probe[i]["content"] = SENTINEL
    rendered = _render(tokenizer, probe, False, tools, thinking)
    if rendered.count(SENTINEL) != 1:
        return None
    pre, post = rendered.split(SENTINEL)
    if not (full.startswith(pre) and full.endswith(post)) or len(pre) + len(post) > len(full) or len(pre) < cursor:
        return None
    start, end = len(pre), len(full) - len(post)
    # the end-of-turn marker right after the content (any special token, e.g. <|im_end|>) is a target
    specials = sorted(getattr(tokenizer, "all_special_tokens", []) or [], key=len, reverse=True)
    eot = next((t for t in specials if t and full.startswith(t, end)), None)
    if eot:
        end += len(eot)
    return start, end


def _search_span(tokenizer, messages, i, full, tools, cursor, thinking=None) -> tuple[int, int] | None:
    """Third way, for turns the sentinel cannot mark (tool-call turns print no content) in templates
    that place text by position (Mistral v0.3 puts tools and the system prompt by the *last* user
    turn, Qwen3 adds a <think> block to the *last* assistant turn): render the conversation up to
    this turn, and once more with the turn replaced by a plain sentinel answer; where the two part
    is where the turn's own text starts. That text is then found in the full rendering."""
    try:
        upto = _render(tokenizer, messages[: i + 1], False, tools, thinking)
        alt = _render(tokenizer, messages[:i] + [{"role": "assistant", "content": SENTINEL}], False, tools, thinking)
    except EdgetuneError:
        return None
    n = 0
    while n < min(len(upto), len(alt)) and upto[n] == alt[n]:
        n += 1
    chunk = upto[n:].rstrip()
    p = full.find(chunk, cursor) if chunk else -1
    return (p, p + len(chunk)) if p >= 0 else None


def _tokenize_with_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> Encoded:
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [0] * len(ids)
        k = 0
        for j, (s, e) in enumerate(enc["offset_mapping"]):
            while k < len(spans) and s >= spans[k][1]:
                k += 1
            # a token overlapping a turn is a target: a template's " " before the content can merge
            # with the content's first word (Mistral's " " + content -> "▁It")
            if k < len(spans) and spans[k][0] < max(e, s + 1) and s < spans[k][1]:
                mask[j] = 1
        return Encoded(ids, mask)
    # Slow tokenizers have no offsets: tokenize segment by segment (may differ at the seams).
    ids, mask, pos = [], [], 0
    for s, e in spans + [(len(text), len(text))]:
        for a, b, m in ((pos, s, 0), (s, e, 1)):
            if b > a:
                part = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
                ids += part
                mask += [m] * len(part)
        pos = e
    return Encoded(ids, mask)


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise EdgetuneError("'messages' must be a list of {role, content} objects.")
    return messages


def _as_messages(x: Any, role: str, what: str) -> list[dict]:
    if isinstance(x, str):
        return [{"role": role, "content": x}]
    return _check_messages(x) if isinstance(x, list) else _bad_field(what)


def _bad_field(what: str):
    raise EdgetuneError(f"'{what}' must be a string or a list of {{role, content}} messages.")


def encode_preference(tokenizer, row: dict, *, max_seq_len: int | None = None) -> tuple[Encoded, Encoded]:
    """(chosen, rejected) token ids + masks for one prepared preference row.

    ``prompt`` (a string = one user turn, or a list of messages) is followed by ``chosen`` / ``rejected``
    (a string = one assistant turn, or a list of messages); each conversation is rendered through the
    chat template as SFT's are, and only the assistant turns of the answer carry loss: assistant turns
    inside a multi-turn prompt are context, never scored. Truncated to ``max_seq_len`` tokens each.
    """
    if not isinstance(row, dict) or not {"prompt", "chosen", "rejected"} <= row.keys():
        raise EdgetuneError("A preference row needs 'prompt', 'chosen' and 'rejected'.",
                            fix="prepare the data with `edgetune data prepare` first")
    prompt = _as_messages(row["prompt"], "user", "prompt")
    out = []
    for which in ("chosen", "rejected"):
        messages = prompt + _as_messages(row[which], "assistant", which)
        tools, thinking = row.get("tools"), row.get("enable_thinking")
        full = _render(tokenizer, messages, False, tools, thinking)
        enc = _tokenize_with_spans(tokenizer, full, _assistant_spans(tokenizer, messages, full, tools, len(prompt), thinking))
        if max_seq_len is not None and len(enc.input_ids) > max_seq_len:
            enc = Encoded(enc.input_ids[:max_seq_len], enc.loss_mask[:max_seq_len])
        out.append(enc)
    return out[0], out[1]


def encode_example(tokenizer, row: dict, *, max_seq_len: int | None = None, truncate: bool = True) -> Encoded:
    """Token ids + loss mask for one prepared row (mlx-lm layouts).

    - ``{"messages": [...]}``: loss on every assistant turn including its end-of-turn token;
    - ``{"prompt", "completion"}``: rendered as a user/assistant exchange through the chat template
      (as mlx-lm does); loss on the completion + end-of-turn / EOS;
    - ``{"text"}``: loss on every token (EOS appended, as mlx-lm does).

    With ``max_seq_len`` and ``truncate`` the result keeps the first ``max_seq_len`` tokens.
    """
    if not isinstance(row, dict):
        raise EdgetuneError("A row must be a JSON object.")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if "messages" in row:
        messages = _check_messages(row["messages"])
        tools, thinking = row.get("tools"), row.get("enable_thinking")
        full = _render(tokenizer, messages, False, tools, thinking)
        enc = _tokenize_with_spans(tokenizer, full, _assistant_spans(tokenizer, messages, full, tools, thinking=thinking))
    elif "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise EdgetuneError("'prompt' and 'completion' must be strings.")
        if has_template:
            return encode_example(
                tokenizer,
                {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]},
                max_seq_len=max_seq_len,
                truncate=truncate,
            )
        p = tokenizer(prompt)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            c = c + [tokenizer.eos_token_id]
        enc = Encoded(list(p) + list(c), [0] * len(p) + [1] * len(c))
    elif "text" in row:
        if not isinstance(row["text"], str):
            raise EdgetuneError("'text' must be a string.")
        ids = list(tokenizer(row["text"])["input_ids"])
        eos = tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        enc = Encoded(ids, [1] * len(ids))
    elif "chosen" in row and "rejected" in row:
        raise UnsupportedError(
            "Preference rows (prompt/chosen/rejected) are DPO/ORPO data: train them with --objective dpo or orpo, not sft.",
            fix="add --objective dpo (or orpo); for SFT, turn each row into "
                "{\"messages\": [user prompt, assistant chosen]}",
        )
    else:
        raise EdgetuneError(
            f"Row has none of 'messages', 'prompt'+'completion', 'text' (keys: {', '.join(map(str, row))}).",
            fix="prepare the data with `edgetune data prepare` first",
        )
    if max_seq_len is not None and truncate and len(enc.input_ids) > max_seq_len:
        enc = Encoded(enc.input_ids[:max_seq_len], enc.loss_mask[:max_seq_len])
    return enc
