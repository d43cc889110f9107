"""edgetune: from a dataset to a fine-tuned model you can run offline."""

import warnings

__version__ = "0.1.0"

# PEFT reads transformers 5's deprecated `is_gradient_checkpointing` alias whenever it wraps a model
# (training, eval with an adapter); the FutureWarning is about their code, not anything a user can fix.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
