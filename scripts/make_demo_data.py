#!/usr/bin/env python3
"""Make the shipped demo dataset: short support messages -> a fixed JSON shape.

    python scripts/make_demo_data.py            # writes edgetune/resources/demo/support_tickets.jsonl
                                                # and support_ticket_pairs.jsonl (preference pairs)
    python scripts/make_demo_data.py --out DIR  # somewhere else (the test compares bytes)

Deterministic (fixed seed, no network, no third-party code): the same script always writes the
same bytes. Each record is chat-format; the assistant answer is compact JSON with the keys
``category``, ``urgency``, ``product`` in that order. The labels are carried by cues a small
model can pick up in a few hundred steps (topic phrases, urgency phrases, a product name spelled
several ways), while greetings, sign-offs and filler give the surface variety that stops it from
memorising whole strings.

The preference pairs (``support_ticket_pairs.jsonl``, for the align stage: DPO/ORPO after SFT) are
new messages of the same task, none of them in the SFT file, so no split of the pairs leaks into
an SFT split or back: ``chosen`` is the correct JSON; ``rejected`` is mostly a JSON with one
field wrong (urgency or category, sometimes the product), sometimes a prose answer that ignores the
"JSON only" instruction. Each wrong value is drawn so that every label is rejected about as often as
it is chosen: a preference set whose rejected side over-represents one label teaches "avoid that
label", not "read the message".
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20260101
N_EXAMPLES = 600
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "edgetune" / "resources" / "demo"
FILENAME = "support_tickets.jsonl"
PAIRS_FILENAME = "support_ticket_pairs.jsonl"
N_PAIRS = 300
PAIRS_SEED = 20260102

CATEGORIES = ("billing", "bug", "account", "shipping", "feature_request")
URGENCIES = ("low", "medium", "high")
# canonical id -> ways customers write it
PRODUCTS = {
    "cloudsync": ("CloudSync", "Cloud Sync", "cloudsync", "the CloudSync app"),
    "paywell": ("PayWell", "Paywell", "Pay Well", "the PayWell app"),
    "taskboard": ("TaskBoard", "Taskboard", "Task Board", "the TaskBoard app"),
    "mailpilot": ("MailPilot", "Mail Pilot", "mailpilot", "the MailPilot app"),
    "homehub": ("HomeHub", "Home Hub", "homehub", "the HomeHub speaker"),
}

# Short on purpose: the label sets are what fine-tuning teaches, so the prompt need not spell them
# out, and every prompt token is paid for at every training step and every eval generation (the
# earlier 55-token prompt listing the labels was half of each example's tokens).
SYSTEM = "Triage the support message. Reply with JSON only: category, urgency, product."

# {p} = product mention. One row per phrasing; the topic words carry the category.
TOPICS = {
    "billing": (
        "I was charged twice for {p} this month",
        "my invoice for {p} shows the wrong amount",
        "I cancelled {p} but you still billed my card",
        "the {p} subscription renewed at a higher price than advertised",
        "I need a refund for my {p} payment",
        "my credit card was declined when paying for {p}",
        "there is a charge from {p} on my statement that I don't recognise",
        "can you send me a VAT invoice for {p}",
        "the discount code was not applied to my {p} bill",
        "I was billed for the annual {p} plan instead of monthly",
        "why did the price of {p} go up on my last invoice",
        "please update the billing address on my {p} account invoices",
    ),
    "bug": (
        "{p} crashes every time I open it",
        "{p} freezes after the latest update",
        "I get an error 500 when I save anything in {p}",
        "{p} shows a blank screen after login",
        "notifications from {p} stopped working",
        "{p} keeps logging me out for no reason",
        "the search in {p} returns no results even for exact matches",
        "{p} drains my battery and gets really slow",
        "files I upload to {p} come out corrupted",
        "the export button in {p} does nothing",
        "{p} shows the wrong time on every entry",
        "sync in {p} fails with an unknown error",
    ),
    "account": (
        "I can't log in to {p}, the password reset email never arrives",
        "please delete my {p} account and all my data",
        "how do I change the email address on my {p} account",
        "my {p} account was locked after too many attempts",
        "I think someone else got into my {p} account",
        "I lost my phone and can't do two-factor login for {p}",
        "please merge my two {p} accounts",
        "how do I change my username in {p}",
        "I want to transfer my {p} account to a colleague",
        "my {p} account says it is suspended",
        "I never got the verification email for {p}",
        "how do I add a second admin to our {p} account",
    ),
    "shipping": (
        "my {p} order hasn't arrived yet",
        "the tracking number for my {p} order doesn't work",
        "{p} arrived damaged in the box",
        "I received the wrong item instead of {p}",
        "my {p} package was delivered to the wrong address",
        "can I change the delivery address for my {p} order",
        "the courier says my {p} parcel is lost",
        "my {p} order has been stuck in customs for two weeks",
        "the {p} box was missing the charger",
        "when will my {p} pre-order ship",
        "I was charged for express delivery but {p} came by standard post",
        "the delivery of {p} was marked complete but nothing came",
    ),
    "feature_request": (
        "it would be great if {p} had a dark mode",
        "could you add an export to CSV option in {p}",
        "please let {p} work offline",
        "I'd love keyboard shortcuts in {p}",
        "can {p} support more than one language",
        "please add a calendar integration to {p}",
        "it would help if {p} could share lists with my team",
        "could {p} get a widget for the home screen",
        "I wish {p} let me schedule things for later",
        "please add an API so we can automate {p}",
        "would you consider adding tags to {p}",
        "can {p} remember my last used settings",
    ),
}

URGENCY_CUES = {
    "low": (
        "No rush at all.",
        "Whenever you have time.",
        "Just a minor thing.",
        "Not urgent, just letting you know.",
        "It can wait until next week.",
        "Low priority for me.",
    ),
    "medium": (
        "Could you look into it this week?",
        "I'd appreciate a reply in the next few days.",
        "It's getting annoying, please check.",
        "Please get back to me soon.",
        "Would be good to sort this out this week.",
        "Please look at this when you can today or tomorrow.",
    ),
    "high": (
        "URGENT, please help right now!",
        "This is blocking my whole team today.",
        "Please fix this ASAP, we are losing customers.",
        "I need this solved immediately.",
        "This is critical, our business is stopped.",
        "Emergency: I need an answer within the hour.",
    ),
}

GREETINGS = ("", "", "Hi,", "Hello,", "Hey team,", "Good morning,", "Hi there,", "Dear support,")
SIGNOFFS = ("", "", "", "Thanks.", "Thank you!", "Cheers,\nSam", "Regards, Priya", "Thanks, Alex", "-- Maria")
FILLERS = ("", "", "", "I already tried restarting.", "I've been a customer for years.",
           "My order number is 48213.", "This started yesterday.", "I'm on the latest version.")


def _message(rng: random.Random, category: str, urgency: str, product: str) -> str:
    topic = rng.choice(TOPICS[category]).format(p=rng.choice(PRODUCTS[product]))
    topic = topic.replace("my the ", "my ").replace("the the ", "the ")  # "my {p}" + "the X app"
    topic = topic[0].upper() + topic[1:] + rng.choice((".", ".", "!", ". "))
    cue = rng.choice(URGENCY_CUES[urgency])
    parts = [rng.choice(GREETINGS)]
    # urgency cue before or after the topic, so position alone is not the signal
    if rng.random() < 0.3:
        parts += [cue, topic]
    else:
        parts += [topic, rng.choice(FILLERS), cue]
    parts.append(rng.choice(SIGNOFFS))
    return " ".join(p.strip() for p in parts if p.strip())


def answer(category: str, urgency: str, product: str) -> str:
    """The target: compact JSON with a fixed key order."""
    return json.dumps({"category": category, "urgency": urgency, "product": product}, separators=(",", ":"))


def make_records(n: int = N_EXAMPLES, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict] = []
    products = sorted(PRODUCTS)
    i = 0
    while len(records) < n:
        # cycle labels so every (category, urgency) pair is balanced; product drawn at random
        category = CATEGORIES[i % len(CATEGORIES)]
        urgency = URGENCIES[(i // len(CATEGORIES)) % len(URGENCIES)]
        product = rng.choice(products)
        i += 1
        text = _message(rng, category, urgency, product)
        if text in seen:  # unique messages only: the data stage would drop exact duplicates
            continue
        seen.add(text)
        records.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": answer(category, urgency, product)},
                ]
            }
        )
    return records


PROSE = (
    "This looks like a {category} issue about {product}. I would rate the urgency as {urgency}.",
    "Thanks for reaching out! Our team will look into your {product} {category} request soon.",
    "Category: {category}. Urgency: {urgency}. Product: {product}.",
    "Sure! Here is the triage: it's a {urgency} priority {category} ticket for {product}.",
)
# which part of the answer a pair's rejected side gets wrong, by pair index: mostly urgency and
# category (the fields a briefly tuned small model still misses), some product, a few prose answers.
# 7 long, coprime with the 5 categories x 3 urgencies the pairs cycle through, so every label meets
# every kind of rejection.
REJECT_KINDS = ("urgency", "category", "urgency", "product", "category", "urgency", "prose")
FIELD_VALUES = {"category": CATEGORIES, "urgency": URGENCIES, "product": tuple(sorted(PRODUCTS))}


class _Balancer:
    """Picks the wrong value of a field so that, over all pairs, every value is rejected about as often
    as it is chosen. With "neighbouring" wrong values instead (low -> medium, high -> medium) "medium"
    was rejected twice as often as chosen and "low" never, so DPO learned "avoid medium" rather than
    reading the message: SFT+DPO answered "low" for medium tickets."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.debt = {(f, v): 0 for f, vs in FIELD_VALUES.items() for v in vs}  # times chosen - times rejected

    def wrong(self, field: str, right: str) -> str:
        self.debt[field, right] += 1
        others = [v for v in FIELD_VALUES[field] if v != right]
        most = max(self.debt[field, v] for v in others)
        pick = self.rng.choice([v for v in others if self.debt[field, v] == most])
        self.debt[field, pick] -= 1
        return pick


def _rejected(rng: random.Random, balancer: _Balancer, k: int, category: str, urgency: str, product: str) -> str:
    kind = REJECT_KINDS[k % len(REJECT_KINDS)]
    if kind == "prose":
        return rng.choice(PROSE).format(category=category.replace("_", " "), urgency=urgency, product=product)
    right = {"category": category, "urgency": urgency, "product": product}
    wrong = dict(right, **{kind: balancer.wrong(kind, right[kind])})
    return answer(wrong["category"], wrong["urgency"], wrong["product"])


def make_pairs(sft_records: list[dict], n: int = N_PAIRS, seed: int = PAIRS_SEED) -> list[dict]:
    """Preference rows whose messages are not in ``sft_records`` (so neither file leaks into the other)."""
    rng = random.Random(seed)
    balancer = _Balancer(rng)
    seen = {r["messages"][1]["content"] for r in sft_records}
    pairs: list[dict] = []
    products = sorted(PRODUCTS)
    i = 0
    while len(pairs) < n:
        category = CATEGORIES[i % len(CATEGORIES)]
        urgency = URGENCIES[(i // len(CATEGORIES)) % len(URGENCIES)]
        product = rng.choice(products)
        i += 1
        text = _message(rng, category, urgency, product)
        if text in seen:
            continue
        seen.add(text)
        pairs.append({
            "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
            "chosen": answer(category, urgency, product),
            "rejected": _rejected(rng, balancer, len(pairs), category, urgency, product),
        })
    return pairs


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(body.encode("utf-8"))
    tmp.replace(path)  # atomic: a crash never leaves a half-written dataset
    return path


def write(out_dir: Path, n: int = N_EXAMPLES, seed: int = SEED, n_pairs: int = N_PAIRS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    records = make_records(n, seed)
    _write_jsonl(out_dir / PAIRS_FILENAME, make_pairs(records, n_pairs))
    return _write_jsonl(out_dir / FILENAME, records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    ap.add_argument("-n", type=int, default=N_EXAMPLES, help="number of examples")
    ap.add_argument("--pairs", type=int, default=N_PAIRS, help="number of preference pairs")
    args = ap.parse_args()
    path = write(args.out, args.n, n_pairs=args.pairs)
    print(f"wrote {args.n} examples to {path} and {args.pairs} preference pairs to {path.with_name(PAIRS_FILENAME)}")


if __name__ == "__main__":
    main()
