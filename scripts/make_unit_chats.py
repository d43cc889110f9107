"""Write N short unit-conversion chats (~45 tokens each with the SmolLM2 template) as JSONL.

A stand-in for a user's own short-example task, for measuring how training sizes its steps:
    python scripts/make_unit_chats.py /tmp/units.jsonl 400
    edgetune data prepare /tmp/units.jsonl -m models/base/smollm2-135m-instruct -o /tmp/units-prepared
"""

from __future__ import annotations

import json
import random
import sys

# (from, to, factor): everyday conversions
UNITS = [("km", "miles", 0.621371), ("kg", "pounds", 2.20462), ("litres", "gallons", 0.264172),
         ("metres", "feet", 3.28084), ("cm", "inches", 0.393701), ("grams", "ounces", 0.035274)]


def chats(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        a, b, f = rng.choice(UNITS)
        x = rng.randint(1, 2000)
        if (a, x) in seen:
            continue  # exact duplicates would be removed by prepare
        seen.add((a, x))
        rows.append({"messages": [
            {"role": "user", "content": f"How many {b} is {x} {a}?"},
            {"role": "assistant", "content": f'{{"value": {x * f:.2f}, "unit": "{b}"}}'}]})
    return rows


if __name__ == "__main__":
    out, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 400
    with open(out, "w") as fh:
        for r in chats(n):
            fh.write(json.dumps(r) + "\n")
