"""Write the shipped reasoning demo dataset: sums of three small numbers, with and without thinking.

    python scripts/make_reasoning_data.py                         # -> edgetune/resources/demo/reasoning_sums.jsonl
    python scripts/make_reasoning_data.py /tmp/sums.jsonl 800     # another path / size

Each row asks for the sum of three numbers from 1-9 in one of several phrasings; the answer is the
number alone, so exact match verifies it. Three rows in four carry brief reasoning in the assistant
turn's ``reasoning_content`` (one addition per step: "7 + 5 = 12. 12 + 8 = 20."): with a thinking
template they are trained with thinking on, the reasoning inside the template's <think> block. The
others carry none and are trained with thinking off, so the model learns to answer both ways and
eval can compare them. Numbers come from a fixed seed; exact duplicates are skipped.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "edgetune" / "resources" / "demo" / "reasoning_sums.jsonl"

PHRASINGS = [
    "What is {a} + {b} + {c}? Answer with the number only.",
    "Add {a}, {b} and {c}. Answer with the number only.",
    "Compute the sum of {a}, {b} and {c}. Answer with the number only.",
    "{a} plus {b} plus {c} equals what? Answer with the number only.",
]


def rows(n: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        a, b, c = (rng.randint(1, 9) for _ in range(3))
        q = rng.choice(PHRASINGS).format(a=a, b=b, c=c)
        if q in seen:
            continue
        seen.add(q)
        answer = {"role": "assistant", "content": str(a + b + c)}
        if rng.random() < 0.75:
            answer["reasoning_content"] = f"{a} + {b} = {a + b}. {a + b} + {c} = {a + b + c}."
        out.append({"messages": [{"role": "user", "content": q}, answer]})
    return out


def main(argv: list[str]) -> None:
    path = Path(argv[0]) if argv else OUT
    n = int(argv[1]) if len(argv) > 1 else 600
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for r in rows(n):
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {n} rows to {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
