"""Go's ``text/template``, the subset Ollama chat templates use, and the Go values Ollama passes them.

The bottom layer of edgetune: it imports nothing of edgetune's, so the data stage (tool-call
canonical JSON) and the Ollama package both build on it.

``parse``: the template text -> a tree; ``engine``: executing a tree; ``values``: Go's value rules
(structs, maps, slices, ``%q``, float64 printing, ``json``) and Ollama's message and tool types.
"""

from .engine import cut_after, render, render_tree
from .parse import GoTemplateError, go_quote, go_unquote, parse, uses_field

__all__ = ["GoTemplateError", "cut_after", "go_quote", "go_unquote", "parse", "render", "render_tree", "uses_field"]
