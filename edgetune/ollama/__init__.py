"""Ollama: the Modelfile for a GGUF (``modelfile``, its syntax in ``modelfile_syntax``), the Go
TEMPLATE for a model's chat template and a chat rendered both ways (``template``), and the offline
check that both render the same prompts (``check``). What ``edgetune ollama`` runs.

The HTTP client for a running Ollama server is :mod:`edgetune.ollama_client`, a layer lower: the
eval stage's ``ollama:`` runner talks to the server and must not import Modelfile code.
"""
