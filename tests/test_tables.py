"""The one-row-per-concept tables against what reads them."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from edgetune import arch as arch_table
from edgetune.arch import ARCHITECTURES

ROOT = Path(__file__).resolve().parents[1]


def test_readme_architecture_table_is_generated_from_the_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Supported model architectures", 1)[1].strip().splitlines()
    shown = "\n".join(itertools.takewhile(lambda line: line.startswith("|"), section))
    assert shown == arch_table.readme_table(), "regenerate README's table with edgetune.arch.readme_table()"


def test_every_row_names_a_llama_cpp_arch_and_an_existing_hparams_hook():
    import gguf

    from edgetune.export.gguf import HPARAMS_HOOKS

    for a in ARCHITECTURES.values():
        assert a.gguf_arch in gguf.MODEL_ARCH_NAMES.values(), a.model_type
        assert a.hparams in HPARAMS_HOOKS, a.model_type
        for alias in a.aliases:
            assert arch_table.get_arch(alias) is a


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_lora_targets_and_memory_shapes_match_the_hf_model(tmp_path, model_type):
    """Each row's linears exist in the HF model under those names, with those (in, out) sizes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgetune.train.memory import _linear_shapes, _model_shapes

    a = ARCHITECTURES[model_type]
    # no two sizes equal, so a swapped or wrong dimension shows
    cfg = AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, vocab_size=128, bos_token_id=0, eos_token_id=1, **a.tiny_config,
    )
    cfg.save_pretrained(tmp_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    real = {
        name.rsplit(".", 1)[-1]: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and re.search(r"\.layers\.0\.", name)
    }
    assert _linear_shapes(_model_shapes(tmp_path), a) == real
    assert set(a.lora_targets) == set(real)
