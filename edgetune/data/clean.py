"""Text cleaning and PII redaction.

Cleaning is conservative (it must not change what a model learns to say): Unicode NFC, CRLF -> LF,
stray BOMs / zero-width characters / control characters removed, surrounding whitespace stripped.
PII redaction replaces matches with a typed placeholder (``[EMAIL]`` …) and counts each kind.
The patterns are a table, most specific first, so an SSN or a card number is not taken for a phone.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

# control characters except \t and \n, zero-width spaces/joiners, BOM, and the replacement char
_JUNK = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\u200c\u200d\u2060\ufeff\ufffd]")


def clean_text(s: str) -> str:
    if not s.isascii():
        s = unicodedata.normalize("NFC", s)
    if "\r" in s:
        s = s.replace("\r\n", "\n").replace("\r", "\n")
    s = _JUNK.sub("", s)
    return s.strip()


def _luhn(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = int(ch)
        if alt:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        alt = not alt
    return total % 10 == 0


# kind -> (pattern, placeholder, extra check on the matched text)
PII_PATTERNS: list[tuple[str, re.Pattern, str]] = [
    ("email", re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}(?![\w-])"), "[EMAIL]"),
    ("ssn", re.compile(r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])"), "[SSN]"),
    ("card", re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])"), "[CARD]"),
    ("ip", re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])"), "[IP]"),
    ("phone", re.compile(
        r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}(?!\w)"
        r"|(?<![\w+])\+\d{7,14}(?!\w)"
    ), "[PHONE]"),
]
PII_KINDS = tuple(k for k, _, _ in PII_PATTERNS)
_HINT = re.compile(r"@|\d{3}")  # cheap pre-check: no '@' and no 3 digits in a row -> no PII here


def redact_pii(s: str, counts: Counter) -> str:
    if not _HINT.search(s):
        return s
    for kind, pat, repl in PII_PATTERNS:
        if kind == "card":
            def sub(m, _repl=repl):
                digits = re.sub(r"\D", "", m.group(0))
                if 13 <= len(digits) <= 19 and _luhn(digits):
                    counts["card"] += 1
                    return _repl
                return m.group(0)

            s = pat.sub(sub, s)
        else:
            s, n = pat.subn(repl, s)
            if n:
                counts[kind] += n
    return s
