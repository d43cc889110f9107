"""Where things live on disk: the models home (registry + demo base model) and runs."""

from __future__ import annotations

import os
from pathlib import Path

DEMO_MODEL_NAME = "smollm2-135m-instruct"


def home() -> Path:
    """The models home: ``$EDGETUNE_HOME`` or ``./models``."""
    return Path(os.environ.get("EDGETUNE_HOME", "models")).expanduser()


def demo_model_dir() -> Path:
    """Folder of the de-quantized demo base model (see ``edgetune models fetch-demo``)."""
    env = os.environ.get("EDGETUNE_DEMO_MODEL")
    if env:
        return Path(env).expanduser()
    return home() / "base" / DEMO_MODEL_NAME
