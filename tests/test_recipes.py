"""Every shipped recipe validates against the config schema and says how to run it."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from edgetune import pipeline
from edgetune.cli import cli
from edgetune.config import config_from_dict
from edgetune.errors import EdgetuneError

RECIPES = sorted(pipeline.recipes_dir().glob("*.yaml"))


def test_the_four_recipes_ship():
    assert {p.stem for p in RECIPES} >= {"quickstart", "mac-lora-7b", "cuda-qlora-8b", "cpu-lora-small"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_and_opens_with_its_command(path):
    cfg = pipeline.load_recipe(path)
    assert cfg.model and cfg.data.path
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# edgetune "), f"{path.name} must open with the command that runs it"
    assert path.stem in first or first.startswith("# edgetune quickstart")
    # the shipped name resolves to the same file
    assert pipeline.find_recipe(path.stem) == path
    assert cfg.export.quants, "every recipe exports at least one quantized GGUF"
    # against forgetting: replay in the SFT data, the regression set evaluated, and a release gate on it
    assert cfg.data.replay > 0 and cfg.eval.regression is True
    want = 0.05 if cfg.model == pipeline.DEMO else 0.02  # the 135M demo's gate is wider (see the recipes' comment)
    assert cfg.eval.max_regression.get("regression.pass_rate") == want


def test_quickstart_uses_the_demo_model_and_data():
    cfg = pipeline.load_recipe("quickstart")
    assert cfg.model == pipeline.DEMO and cfg.data.path == pipeline.DEMO
    assert pipeline.resolve_data(cfg.data.path).is_file()
    assert "q4_k_m" in cfg.export.quants and cfg.train.iters


def test_schema_rejects_bad_recipes(tmp_path):
    with pytest.raises(EdgetuneError, match="Unknown setting"):
        config_from_dict({"model": "m", "train": {"rnak": 8}})
    with pytest.raises(EdgetuneError, match="not one of"):
        config_from_dict({"model": "m", "train": {"method": "magic"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ntrain: [1, 2\n")
    with pytest.raises(EdgetuneError, match="Invalid YAML"):
        pipeline.load_recipe(bad)
    with pytest.raises(EdgetuneError, match="Recipe not found"):
        pipeline.find_recipe("no-such-recipe")


def test_overrides_apply():
    cfg = pipeline.load_recipe("quickstart", ["train.iters=7", "name=exp2", "export.quants=q8_0,q4_k_m"])
    assert cfg.train.iters == 7 and cfg.name == "exp2" and cfg.export.quants == ["q8_0", "q4_k_m"]


@pytest.mark.parametrize("name", ["quickstart", "cuda-qlora-8b"])
def test_plan_prints_without_doing_anything(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["plan", name, "--set", f"output={tmp_path / 'runs'}"])
    assert r.exit_code == 0, r.output
    for stage in pipeline.STAGES:
        assert stage in r.output
    assert "backend:" in r.output or "training cannot run here" in r.output
    assert not (tmp_path / "runs").exists(), "plan must not create the run folder"
    if name == "cuda-qlora-8b":
        assert "base model folder not found" in r.output
