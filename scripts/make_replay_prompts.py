"""Write the shipped general prompt set that replay answers with the base model itself.

    python scripts/make_replay_prompts.py      # -> edgetune/resources/replay/general_prompts.jsonl

`data.replay` mixes the base model's own answers to these prompts into the training split, so a
narrow fine-tune keeps rehearsing general behaviour (explaining, listing, writing, rewriting,
answering how-to questions, small arithmetic) in the model's own words. The prompts are built here
from hand-written task styles and topics with a fixed seed; none is taken from a benchmark, and the
test suite checks that none is a duplicate or near duplicate of the regression set edgetune scores.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "edgetune" / "resources" / "replay" / "general_prompts.jsonl"

TOPICS = [
    "photosynthesis", "the water cycle", "compound interest", "how a bicycle gear works", "why the sky looks blue at noon",
    "the difference between weather and climate", "how vaccines are tested", "what a database index does",
    "how bread rises", "why we have leap years", "the role of bees in farming", "how a refrigerator keeps food cold",
    "what inflation means for savings", "how tides form", "the purpose of a budget", "how solar panels make electricity",
    "what a spreadsheet is for", "how noise-cancelling headphones work", "why exercise improves sleep",
    "what recycling does with plastic bottles", "how a library catalogue is organised", "what a password manager does",
    "how trains stay on their tracks", "why ice floats on water", "how maps show height", "what a cover letter is",
]
THINGS = [
    ("a train", "a bus"), ("tea", "coffee"), ("renting", "buying a home"), ("email", "a phone call"),
    ("paper books", "e-readers"), ("walking", "cycling to work"), ("a laptop", "a desktop computer"),
    ("cats", "dogs as pets"), ("a shower", "a bath"), ("cash", "card payments"), ("city life", "village life"),
    ("summer holidays", "winter holidays"),
]
GOALS = [
    "sleep better", "save money on groceries", "learn a new language", "keep a plant alive", "prepare for a job interview",
    "write clearer emails", "stay focused while studying", "start running", "organise a small kitchen", "reduce screen time",
    "remember names", "cook rice well", "pack for a weekend trip", "keep a tidy desk", "make a presentation less boring",
]
SUBJECTS = [
    "autumn leaves", "a quiet library", "the first snow", "a morning train", "a lighthouse", "a cup of tea", "rain on a window",
    "a busy market", "the moon over a lake", "an old bicycle",
]
REWRITE = [
    "the meeting has been moved to thursday because the room was not available",
    "pls send me the report asap i need it for the client",
    "We regret to inform you that your order will arrive later than expected.",
    "the cat sat on the mat and looked at the bird outside for a long time",
    "Thank you for your application. We will contact you soon.",
    "it is raining so we will stay inside and play board games",
]
WORDS = ["curious", "generous", "reliable", "fragile", "ancient", "efficient", "brief", "humble", "vivid", "patient",
         "transparent", "gradual"]
STYLES = [
    ("explain", "Explain {t} in two or three sentences."),
    ("explain", "Give a short, simple explanation of {t} for a twelve-year-old."),
    ("list", "List three facts about {t}."),
    ("compare", "What are the main differences between {a} and {b}? Keep it short."),
    ("advice", "Give me three practical tips to {g}."),
    ("advice", "How can I {g}? Answer in a few sentences."),
    ("write", "Write a short poem of four lines about {s}."),
    ("write", "Write one sentence describing {s}."),
    ("rewrite", "Rewrite this sentence so it is polite and clear: {r}"),
    ("rewrite", "Correct the capitalisation and punctuation: {r}"),
    ("define", "What does the word \"{w}\" mean? Give an example sentence."),
    ("define", "Give two synonyms for \"{w}\" and use one in a sentence."),
    ("email", "Write a two-sentence email asking a colleague to {g2}."),
    ("math", "A shop sells pens at {p} cents each. How much do {n} pens cost? Show the calculation."),
    ("math", "I walk {k} kilometres a day. How far do I walk in {d} days?"),
]
ASKS = ["review my notes before Friday", "join a short call tomorrow", "share the slides from the meeting",
        "check the numbers in the budget", "suggest a date for the team lunch", "send the signed form back"]


def prompts(seed: int = 11) -> list[dict]:
    rng = random.Random(seed)
    out: list[dict] = []
    seen: set[str] = set()

    def add(kind, text):
        if text not in seen:
            seen.add(text)
            out.append({"id": f"{kind}-{sum(o['id'].startswith(kind) for o in out) + 1:03d}", "kind": kind, "prompt": text})

    for t in TOPICS:
        for kind, tpl in STYLES[:3]:
            add(kind, tpl.format(t=t))
    for a, b in THINGS:
        add("compare", STYLES[3][1].format(a=a, b=b))
    for g in GOALS:
        add("advice", STYLES[4][1].format(g=g))
        add("advice", STYLES[5][1].format(g=g))
    for s in SUBJECTS:
        add("write", STYLES[6][1].format(s=s))
        add("write", STYLES[7][1].format(s=s))
    for r in REWRITE:
        add("rewrite", STYLES[8][1].format(r=r))
        add("rewrite", STYLES[9][1].format(r=r))
    for w in WORDS:
        add("define", STYLES[10][1].format(w=w))
        add("define", STYLES[11][1].format(w=w))
    for g2 in ASKS:
        add("email", STYLES[12][1].format(g2=g2))
    for _ in range(12):
        add("math", STYLES[13][1].format(p=rng.choice([15, 20, 35, 40, 55]), n=rng.randint(3, 12)))
        add("math", STYLES[14][1].format(k=rng.randint(2, 9), d=rng.randint(3, 14)))
    rng.shuffle(out)  # replay takes a prefix: a prefix of any length mixes every kind
    return out


def main(argv: list[str]) -> None:
    path = Path(argv[0]) if argv else OUT
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = prompts()
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} prompts to {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
