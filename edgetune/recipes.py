"""Recipes and the values they name: shipped recipe files, ``demo`` for the demo model and data.

A recipe is a YAML file (see :mod:`edgetune.config`), a shipped recipe name (``quickstart``), or
a run folder, whose ``run.yaml`` holds the settings it ran with.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .config import RunConfig, load_config
from .errors import EdgetuneError

DEMO = "demo"  # recipe value meaning "the demo base model" / "the shipped demo dataset"
DEMO_DATA = "support_tickets.jsonl"
DEMO_PAIRS = "demo-pairs"  # recipe value meaning "the shipped demo preference pairs" (align.data)
DEMO_PAIRS_DATA = "support_ticket_pairs.jsonl"  # scripts/make_demo_data.py; prompts disjoint from DEMO_DATA's


def demo_data_path() -> Path:
    return Path(str(resources.files("edgetune") / "resources" / "demo" / DEMO_DATA))


def demo_resource(value: str) -> Path | None:
    """``demo:NAME`` -> the file NAME shipped in edgetune/resources/demo/ (a recipe's data or chat
    template that travels with the package, e.g. ``demo:tool_calls.jsonl``); None for other values."""
    if not isinstance(value, str) or not value.startswith(DEMO + ":"):
        return None
    name = value[len(DEMO) + 1:]
    path = demo_data_path().parent / name
    if "/" in name or "\\" in name or not path.is_file():
        shipped = sorted(p.name for p in demo_data_path().parent.iterdir())
        raise EdgetuneError(f"No shipped demo file {name!r}.", fix=f"use one of: {', '.join('demo:' + n for n in shipped)}")
    return path


def recipes_dir() -> Path:
    return Path(str(resources.files("edgetune") / "resources" / "recipes"))


def find_recipe(recipe: str | Path) -> Path:
    """A recipe file, a run folder (its run.yaml), or a shipped recipe name (``quickstart``, ``mac-lora-7b`` …)."""
    p = Path(recipe)
    if p.is_file():
        return p
    if p.is_dir() and (p / "run.yaml").is_file():  # a run folder: continue it with its own settings
        return p / "run.yaml"
    shipped = recipes_dir() / f"{Path(str(recipe)).stem}.yaml"
    if not p.suffix and shipped.is_file():
        return shipped
    names = sorted(f.stem for f in recipes_dir().glob("*.yaml"))
    raise EdgetuneError(f"Recipe not found: {recipe}", fix=f"give a YAML file, or a shipped recipe: {', '.join(names)}")


def load_recipe(recipe: str | Path, overrides: list[str] | None = None) -> RunConfig:
    return load_config(find_recipe(recipe), overrides)


def resolve_model(model: str) -> Path:
    from .paths import demo_model_dir

    if not model:
        raise EdgetuneError("The recipe names no base model.", fix="set `model: path/to/hf-folder` (or `model: demo`)")
    return demo_model_dir() if model == DEMO else Path(model).expanduser()


def resolve_data(path: str | None) -> Path:
    if not path:
        raise EdgetuneError("The recipe names no training data.", fix="set `data: {path: file.jsonl}` (or `path: demo`)")
    if path == DEMO_PAIRS:
        return demo_data_path().with_name(DEMO_PAIRS_DATA)
    return demo_data_path() if path == DEMO else demo_resource(path) or Path(path).expanduser()


def require_model(model_dir: Path, model: str) -> Path:
    if not (model_dir / "config.json").is_file():
        fix = "run `edgetune models fetch-demo`" if model == DEMO else "point `model:` at a local HF model folder (config.json, safetensors, tokenizer)"
        raise EdgetuneError(f"Base model folder not found or incomplete: {model_dir}", where=str(model_dir), fix=fix)
    return model_dir
