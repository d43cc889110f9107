"""Click option bundles shared across commands (decorators), so flags are spelled one way."""

from __future__ import annotations

import click


def model_option(required: bool = False, help_: str = "Base model folder (HF format). Default: the demo model."):
    return click.option("--model", "-m", "model", type=click.Path(file_okay=False), required=required, help=help_)


def output_option(required: bool = True, help_: str = "Output path."):
    return click.option("--output", "-o", "output", type=click.Path(), required=required, help=help_)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(f)


def seed_option(f):
    return click.option("--seed", type=int, default=None, help="Random seed (default from the config).")(f)


def target_options(f):
    """--target NAME / --target-memory SIZE: size a plan for another machine (edgetune/stageplan.py TARGETS)."""
    f = click.option("--target-memory", default=None, metavar="SIZE",
                     help="Check the plan against this much memory (e.g. 16GB) instead of what is free here.")(f)
    return click.option("--target", default=None, metavar="PROFILE",
                        help="Check the plan against a machine profile: mac-16gb, mac-32gb, rtx-4090-24gb, ... "
                             "(the TARGETS table in edgetune/stageplan.py).")(f)


def force_option(f):
    return click.option("--force", is_flag=True,
                        help="Start even when the plan says it will not fit in memory.")(f)
