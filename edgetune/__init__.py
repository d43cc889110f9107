"""edgetune: from a dataset to a fine-tuned model you can run offline."""

__version__ = "0.1.0"
