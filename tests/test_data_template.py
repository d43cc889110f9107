"""Chat-template rendering and completion-only loss masks, on the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest

from edgetune.data.template import Encoded, encode_example, load_tokenizer, render_prompt
from edgetune.errors import EdgetuneError

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, and trailing space \n"},
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def _loss_segments(tok, enc: Encoded) -> list[str]:
    segs, cur = [], []
    for i, m in zip(enc.input_ids, enc.loss_mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            segs.append(tok.decode(cur))
            cur = []
    if cur:
        segs.append(tok.decode(cur))
    return segs


def test_multiturn_mask_covers_exactly_assistant_turns_and_end_of_turn(tok):
    enc = encode_example(tok, {"messages": CONV})
    # ids are exactly what the tokenizer's own template produces
    assert enc.input_ids == list(tok.apply_chat_template(CONV, tokenize=True, return_dict=False))
    assert len(enc.loss_mask) == len(enc.input_ids)
    assert _loss_segments(tok, enc) == [
        "Hello! How can I help?<|im_end|>",
        "4, and trailing space \n<|im_end|>",
    ]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    # every <|im_end|> closing an assistant turn carries loss; the ones closing system/user do not
    ends = [m for i, m in zip(enc.input_ids, enc.loss_mask, strict=True) if i == im_end]
    assert ends == [0, 0, 1, 0, 1]
    # the token after each assistant <|im_end|> (the "\n" separator) carries no loss
    for j, (i, m) in enumerate(zip(enc.input_ids, enc.loss_mask, strict=True)):
        if i == im_end and m and j + 1 < len(enc.input_ids):
            assert enc.loss_mask[j + 1] == 0


def test_prompt_completion_and_text_layouts(tok):
    enc = encode_example(tok, {"prompt": "Say hi", "completion": "hi!"})
    assert _loss_segments(tok, enc) == ["hi!<|im_end|>"]
    enc = encode_example(tok, {"text": "hello world"})
    assert all(enc.loss_mask) and enc.input_ids[-1] == tok.eos_token_id
    assert tok.decode(enc.input_ids[:-1]) == "hello world"


def test_truncation(tok):
    full = encode_example(tok, {"messages": CONV})
    short = encode_example(tok, {"messages": CONV}, max_seq_len=10)
    assert short.input_ids == full.input_ids[:10] and short.loss_mask == full.loss_mask[:10]
    kept = encode_example(tok, {"messages": CONV}, max_seq_len=10, truncate=False)
    assert kept == full


def test_render_prompt_ends_with_generation_prompt(tok):
    text = render_prompt(tok, CONV[:2])
    assert text.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert not render_prompt(tok, CONV[:2], add_generation_prompt=False).endswith("assistant\n")


def test_missing_template_is_refused_unless_given(tokenizer_dir, tmp_path):
    import json
    import shutil

    for f in tokenizer_dir.iterdir():
        if f.name != "chat_template.jinja":
            shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgetuneError, match="no chat template"):
        load_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path, chat_template="chatml")
    enc = encode_example(tok, {"messages": CONV[1:3]})
    assert _loss_segments(tok, enc) == ["Hello! How can I help?<|im_end|>"]
    tpl = tmp_path / "t.jinja"
    tpl.write_text(tok.chat_template)
    assert load_tokenizer(tmp_path, chat_template=str(tpl)).chat_template == tok.chat_template
    with pytest.raises(EdgetuneError, match="neither a file nor a known family"):
        load_tokenizer(tmp_path, chat_template="no-such-family")
    with pytest.raises(EdgetuneError, match="not found"):
        load_tokenizer(tmp_path / "missing")


def test_prefix_inconsistent_template_still_masks_each_assistant_turn(tokenizer_dir):
    """A Qwen3-style template drops earlier turns' reasoning, so prefixes are not prefixes."""
    tok = load_tokenizer(tokenizer_dir)
    tok.chat_template = (
        "{% for m in messages %}"
        "{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\\n' + m['content'].split('</think>')[-1].lstrip() + '<|im_end|>\\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    conv = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>hidden</think> Answer one."},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "<think>more</think> Answer two."},
    ]
    enc = encode_example(tok, {"messages": conv})
    assert enc.input_ids == list(tok.apply_chat_template(conv, tokenize=True, return_dict=False))
    assert _loss_segments(tok, enc) == ["Answer one.<|im_end|>", "<think>more</think> Answer two.<|im_end|>"]


@pytest.mark.parametrize("family", ["chatml", "llama3", "gemma", "mistral", "phi3", "zephyr"])
def test_known_families_mask_assistant_content_and_turn_end(tokenizer_dir, family):
    from edgetune.data.template import KNOWN_TEMPLATES

    tok = load_tokenizer(tokenizer_dir, chat_template=family)
    assert tok.chat_template == KNOWN_TEMPLATES[family]
    conv = CONV[1:] if family == "mistral" else CONV
    enc = encode_example(tok, {"messages": conv})
    assert enc.input_ids == list(tok.apply_chat_template(conv, tokenize=True, return_dict=False))
    segs = _loss_segments(tok, enc)
    answers = [m["content"] for m in conv if m["role"] == "assistant"]
    assert len(segs) == len(answers)
    for seg, ans in zip(segs, answers, strict=True):
        assert seg.strip().startswith(ans.strip()) and len(seg.strip()) > len(ans.strip())  # + end-of-turn
    assert not any(u["content"] in "".join(segs) for u in conv if u["role"] != "assistant")
    if family == "gemma":
        assert "Be brief.\n\nHi there" in render_prompt(tok, CONV[:2])
