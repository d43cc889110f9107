"""Quantization: a GGUF to the quant types of :mod:`edgetune.qtypes` (``quantize``), the search for
the smallest type within a drift budget (``autoquant``, ``--quant auto``), and ``build``: what
``edgetune export`` runs (convert, importance matrix, quantize, drift).
"""
