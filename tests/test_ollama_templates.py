"""Every chat-template family: the Modelfile built from the family's real Jinja template renders
the same prompts as the template itself (text for tokenizers we don't have offline, token ids for
the real SmolLM2 tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgetune.chat_families import FAMILY_BY_NAME
from edgetune.errors import EdgetuneError
from edgetune.jinja import render_jinja
from edgetune.ollama.check import check_modelfile
from edgetune.ollama.modelfile import build_modelfile, write_modelfile
from edgetune.ollama.modelfile_syntax import parse_modelfile, read_modelfile
from edgetune.ollama.template import render_ollama

TEMPLATES = Path(__file__).parent / "templates"
META = {k: v for k, v in json.loads((TEMPLATES / "families.json").read_text()).items() if not k.startswith("_")}


def make_hf_dir(d: Path, name: str) -> Path:
    m = META[name]
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"chat_template": (TEMPLATES / f"{name}.jinja").read_text(), "bos_token": m["bos_token"],
           "eos_token": m["eos_token"], "add_bos_token": m["add_bos_token"]}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    (d / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1}))
    return d


@pytest.mark.parametrize("name", sorted(META))
def test_family_from_gguf_metadata(tmp_path, name, family_meta_gguf):
    gguf = family_meta_gguf(tmp_path / "model.gguf", name)
    out = tmp_path / "ollama"
    mf_path = write_modelfile(gguf, out, f"test-{name}", system='Be brief. Say "ok" {{ not a template }}')
    mf = read_modelfile(mf_path)
    assert mf.get("model") == "../model.gguf"  # sibling of the Modelfile folder: relative
    result = check_modelfile(mf_path)
    assert result.family == META[name]["family"]
    identical = [c for c in result.conversations if c.status == "identical"]
    assert result.ok, result.diff
    assert len(identical) >= 5
    # single / multi-turn, with / without system all among the compared conversations
    names = {c.name for c in identical}
    assert {"single turn", "two turns", "three turns, unicode", "training example"} <= names
    stops = mf.parameters["stop"]
    assert META[name]["eos_token"] in stops
    for s in FAMILY_BY_NAME[result.family].stops:
        assert s in stops
    assert mf.parameters["num_ctx"] == ["8192"]  # capped context length


@pytest.mark.parametrize("name", sorted(META))
def test_family_from_hf_folder_and_text_identity(tmp_path, name, family_meta_gguf):
    """Text comparison done here by hand, independently of check(): Jinja (transformers-style) vs
    Ollama's rendering with the BOS llama.cpp would add."""
    gguf = family_meta_gguf(tmp_path / "model.gguf", name)
    hf = make_hf_dir(tmp_path / "hf", name)
    text, result = build_modelfile(gguf, tmp_path, f"test-{name}", model_dir=hf)
    assert result.ok and result.n_identical >= 5, result.diff
    template = parse_modelfile(text).get("template")
    m = META[name]
    convs = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
         {"role": "user", "content": "Again"}],
    ]
    compared = 0
    for conv in convs:
        agp = conv[-1]["role"] != "assistant"
        try:
            want = render_jinja((TEMPLATES / f"{name}.jinja").read_text(), conv, add_generation_prompt=agp,
                                bos_token=m["bos_token"], eos_token=m["eos_token"])
        except Exception:  # noqa: BLE001 - families without a system role reject those chats
            assert conv[0]["role"] == "system"
            continue
        bos = m["bos_token"] or ""
        if m["add_bos_token"] and not want.startswith(bos):
            want = bos + want
        got = (bos if m["add_bos_token"] else "") + render_ollama(template, conv)
        assert got == want, (name, conv)
        compared += 1
    assert compared >= 3
    mf = parse_modelfile(text)
    assert mf.parameters["temperature"] == ["0.6"] and mf.parameters["repeat_penalty"] == ["1.1"]
    assert mf.parameters["num_ctx"] == ["4096"]


@pytest.mark.slow
def test_smollm2_tokens_identical(tmp_path, tokenizer_dir, demo_gguf_path):
    """The demo model's Modelfile: token ids from the real SmolLM2 tokenizer are identical."""
    mf_path = write_modelfile(demo_gguf_path, tmp_path, "smollm2-demo", model_dir=tokenizer_dir)
    result = check_modelfile(mf_path, tokenizer_dir)
    assert result.ok, result.diff
    assert all(c.compared == "tokens" for c in result.conversations)
    assert result.n_identical >= 5
    assert all(c.n_tokens > 10 for c in result.conversations)
    mf = read_modelfile(mf_path)
    assert mf.get("license") == "apache-2.0"  # from the GGUF metadata
    assert "You are a helpful AI assistant named SmolLM" in mf.get("template")  # template's default system


@pytest.mark.slow
def test_tampered_template_is_caught_with_a_diff(tmp_path, tokenizer_dir, demo_gguf_path):
    mf_path = write_modelfile(demo_gguf_path, tmp_path, "smollm2-demo", model_dir=tokenizer_dir)
    text = mf_path.read_text().replace("<|im_end|>\n{{ end }}\n{{- if and", "<|im_end|>{{ end }}\n{{- if and")
    assert text != mf_path.read_text()
    mf_path.write_text(text)
    result = check_modelfile(mf_path, tokenizer_dir)
    assert not result.ok
    assert "part at position" in result.diff and "'Ċ'" in result.diff  # the missing newline token


def test_unknown_template_refused_unless_template_file(tmp_path, family_meta_gguf):
    gguf = family_meta_gguf(tmp_path / "model.gguf", "chatml")
    hf = make_hf_dir(tmp_path / "hf", "chatml")
    cfg = json.loads((hf / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<<assistant>>{% endif %}"
    (hf / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgetuneError, match="not one of the families"):
        write_modelfile(gguf, tmp_path / "out", "x", model_dir=hf)
    assert not (tmp_path / "out" / "Modelfile").exists()
    tfile = tmp_path / "t.tmpl"
    tfile.write_text("{{- range .Messages }}<<{{ .Role }}>>{{ .Content }}{{ end }}<<assistant>>")
    path = write_modelfile(gguf, tmp_path / "out", "x", model_dir=hf, template_file=tfile)
    assert read_modelfile(path).get("template") == tfile.read_text()


def test_adapter_relative_paths_and_overrides(tmp_path, family_meta_gguf):
    out = tmp_path / "run"
    gguf = family_meta_gguf((out / "gguf").mkdir(parents=True) or out / "gguf" / "base.gguf", "llama3")
    adapter = family_meta_gguf(out / "gguf" / "adapter.gguf", "llama3")
    path = write_modelfile(gguf, out, "x", adapter_gguf=adapter, temperature=0.0, num_ctx=2048, top_k=40)
    mf = read_modelfile(path)
    assert mf.get("model") == "./gguf/base.gguf" and mf.get("adapter") == "./gguf/adapter.gguf"
    assert mf.parameters["temperature"] == ["0"] and mf.parameters["num_ctx"] == ["2048"] and mf.parameters["top_k"] == ["40"]
    assert check_modelfile(path).ok  # FROM resolved relative to the Modelfile, as Ollama does
    # a Modelfile in a sibling folder of the GGUFs (run/ollama next to run/gguf) refers to ../gguf
    path = write_modelfile(gguf, out / "ollama", "x", adapter_gguf=adapter)
    mf = read_modelfile(path)
    assert mf.get("model") == "../gguf/base.gguf" and mf.get("adapter") == "../gguf/adapter.gguf"
    assert check_modelfile(path).ok


def test_missing_inputs_are_clear_errors(tmp_path):
    with pytest.raises(EdgetuneError, match="GGUF file not found"):
        write_modelfile(tmp_path / "nope.gguf", tmp_path, "x")
    with pytest.raises(EdgetuneError, match="Modelfile not found"):
        check_modelfile(tmp_path / "Modelfile")


def test_system_defaults_to_training_data_dominant_prompt(tmp_path, family_meta_gguf):
    gguf = family_meta_gguf(tmp_path / "model.gguf", "chatml")
    data = tmp_path / "train.jsonl"
    sys_a = 'You turn tickets into JSON.\nKeys: "team", "urgency".'
    rows = [{"messages": [{"role": "system", "content": sys_a}, {"role": "user", "content": f"t{i}"},
                          {"role": "assistant", "content": "{}"}]} for i in range(3)]
    rows.append({"messages": [{"role": "user", "content": "no system"}, {"role": "assistant", "content": "{}"}]})
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    mf = read_modelfile(write_modelfile(gguf, tmp_path, "x", train_data=data))
    assert mf.get("system") == sys_a
    mf = read_modelfile(write_modelfile(gguf, tmp_path, "x", train_data=data, system="explicit wins"))
    assert mf.get("system") == "explicit wins"


def test_ollama_message_handling():
    """SYSTEM is prepended only when the chat has no system message; consecutive same-role
    messages are merged with a blank line (Ollama's collate), tool results are not."""
    from edgetune.ollama.template import ollama_messages

    system, msgs = ollama_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                    {"role": "tool", "content": "t1"}, {"role": "tool", "content": "t2"}], "S")
    assert system == "S"
    assert [(m["Role"], m["Content"]) for m in msgs] == [("system", "S"), ("user", "a\n\nb"), ("tool", "t1"), ("tool", "t2")]
    system, msgs = ollama_messages([{"role": "system", "content": "mine"}, {"role": "user", "content": "q"}], "S")
    assert system == "mine" and msgs[0]["Content"] == "mine"


def test_legacy_prompt_response_template_is_rendered_like_ollama(tmp_path, family_meta_gguf):
    """A user --template in Ollama's older .System/.Prompt/.Response style: executed per exchange,
    the last one cut after {{ .Response }}, and checked for every chat that asks for an answer."""
    gguf = family_meta_gguf(tmp_path / "model.gguf", "chatml")
    tfile = tmp_path / "legacy.tmpl"
    tfile.write_text("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
                     "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
                     "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n")
    text, result = build_modelfile(gguf, tmp_path, "x", template_file=tfile, system="S")
    assert result.ok, result.diff
    asked = [c for c in result.conversations if c.status == "identical"]
    assert len(asked) >= 5 and all(c.status == "skipped" for c in result.conversations if "training" in c.name)
    # a broken legacy template (no newline after the user turn) is caught
    tfile.write_text(tfile.read_text().replace("{{ .Prompt }}<|im_end|>\n", "{{ .Prompt }}<|im_end|>"))
    _, bad = build_modelfile(gguf, tmp_path, "x", template_file=tfile)
    assert not bad.ok and "part at character" in bad.diff


def test_default_system_with_template_delimiters_is_escaped(tmp_path, family_meta_gguf):
    """A chat template whose built-in system prompt contains '{{' gets it as a Go string literal."""
    gguf = family_meta_gguf(tmp_path / "model.gguf", "smollm2")
    hf = make_hf_dir(tmp_path / "hf", "smollm2")
    cfg = json.loads((hf / "tokenizer_config.json").read_text())
    cfg["chat_template"] = cfg["chat_template"].replace("You are a helpful AI assistant named SmolLM",
                                                        'Fill {{ name }} and "quotes" \\\\ here')
    assert "{{ name }}" in cfg["chat_template"]
    (hf / "tokenizer_config.json").write_text(json.dumps(cfg))
    text, result = build_modelfile(gguf, tmp_path, "x", model_dir=hf)
    assert result.ok and result.n_identical >= 5, result.diff
    assert '{{ "Fill {{ name }} and \\"quotes\\"' in parse_modelfile(text).get("template")


@pytest.mark.slow
def test_demo_model_modelfile_passes_check(tmp_path, demo_model_dir, demo_gguf_path):
    """The demo model (HF folder + its GGUF): token-identical, generation defaults carried over."""
    path = write_modelfile(demo_gguf_path, tmp_path, "smollm2-demo", model_dir=demo_model_dir)
    result = check_modelfile(path, demo_model_dir)
    assert result.ok and result.n_identical >= 5 and {c.compared for c in result.conversations} == {"tokens"}
    gen = json.loads((demo_model_dir / "generation_config.json").read_text())
    params = read_modelfile(path).parameters
    if "temperature" in gen:
        assert float(params["temperature"][0]) == pytest.approx(gen["temperature"])
    assert params["stop"][:2] == ["<|im_end|>", "<|im_start|>"]


def test_modelfile_options_object_and_keywords(tmp_path, family_meta_gguf):
    """One options dataclass for build/write_modelfile and the CLI; keyword fields override it."""
    from edgetune.config import OllamaConfig
    from edgetune.ollama.modelfile import ModelfileOptions

    gguf = family_meta_gguf(tmp_path / "model.gguf", "chatml")
    hf = make_hf_dir(tmp_path / "hf", "chatml")
    opts = ModelfileOptions.from_config(OllamaConfig(system="Be brief.", num_ctx=2048, top_k=40), model_dir=hf)
    mf = read_modelfile(write_modelfile(gguf, tmp_path / "a", "x", opts, top_k=7))
    assert mf.get("system") == "Be brief."
    assert mf.parameters["num_ctx"] == ["2048"] and mf.parameters["top_k"] == ["7"]
    assert mf.parameters["temperature"] == ["0.6"]  # from the HF folder's generation_config.json
    assert opts.top_k == 40  # the caller's options are not changed
    with pytest.raises(TypeError):
        build_modelfile(gguf, tmp_path, "x", no_such_option=1)
