"""The one chat-template family table: every row's two sides (the training Jinja template and the
Ollama Go TEMPLATE) render the same prompts, so adding a family is one row and this test covers it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgetune.chat_families import FAMILIES, detect_family, training_templates
from edgetune.data.template import KNOWN_TEMPLATES, resolve_chat_template
from edgetune.export.model_info import ModelInfo
from edgetune.ollama.check import compare
from edgetune.ollama.template import go_template_for

WITH_JINJA = [f for f in FAMILIES if f.jinja is not None]


def test_training_templates_come_from_the_table():
    assert KNOWN_TEMPLATES == training_templates()
    assert set(KNOWN_TEMPLATES) == {"qwen2.5", "qwen3", "chatml", "llama3", "gemma", "mistral", "phi3", "zephyr"}
    for fam in WITH_JINJA:
        assert resolve_chat_template(fam.name) == fam.jinja
        assert resolve_chat_template(fam.name.upper()) == fam.jinja


@pytest.mark.parametrize("fam", WITH_JINJA, ids=lambda f: f.name)
def test_training_template_is_detected_as_its_own_family(fam):
    assert detect_family(fam.jinja) is fam


@pytest.mark.parametrize("add_bos", [True, False], ids=["gguf-adds-bos", "template-carries-bos"])
@pytest.mark.parametrize("fam", WITH_JINJA, ids=lambda f: f.name)
def test_go_side_renders_the_training_template(fam, add_bos):
    """A model trained with ``--chat-template NAME`` gets a Modelfile TEMPLATE (from the same row)
    that renders every check conversation to the same text, with and without a Modelfile SYSTEM."""
    info = ModelInfo(chat_template=fam.jinja, bos_token="<s>", eos_token="</s>", add_bos=add_bos, source=fam.name)
    got_fam, go = go_template_for(info)
    assert got_fam is fam
    for system in (None, "Answer in one word."):
        result = compare(go, info, system, family=fam.name, use_tokenizer=False)
        assert result.ok, result.diff
        assert result.n_identical >= 4
        assert {c.compared for c in result.conversations if c.status != "skipped"} == {"text"}


def test_every_row_is_tested_against_a_real_template():
    """Rows without a training template are covered by a reference template in tests/templates."""
    meta = json.loads((Path(__file__).parent / "templates" / "families.json").read_text())
    fixtures = {v["family"] for k, v in meta.items() if not k.startswith("_")}
    assert {f.name for f in FAMILIES} <= fixtures | {f.name for f in WITH_JINJA}
