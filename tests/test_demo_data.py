"""The shipped demo dataset is exactly what scripts/make_demo_data.py writes, and has the promised shape."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "edgetune" / "resources" / "demo" / "support_tickets.jsonl"
PAIRS = SHIPPED.with_name("support_ticket_pairs.jsonl")


def test_script_reproduces_shipped_file_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    assert (tmp_path / SHIPPED.name).read_bytes() == SHIPPED.read_bytes()
    assert (tmp_path / PAIRS.name).read_bytes() == PAIRS.read_bytes()


def test_shipped_file_shape_and_labels():
    rows = [json.loads(line) for line in SHIPPED.read_text(encoding="utf-8").splitlines()]
    assert 500 <= len(rows) <= 800
    users = [r["messages"][1]["content"] for r in rows]
    assert len(set(users)) == len(users), "user messages must be unique (the data stage drops exact duplicates)"
    labels = Counter()
    for r in rows:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["system", "user", "assistant"]
        answer = r["messages"][2]["content"]
        obj = json.loads(answer)
        assert list(obj) == ["category", "urgency", "product"]
        assert answer == json.dumps(obj, separators=(",", ":"))
        assert obj["category"] in {"billing", "bug", "account", "shipping", "feature_request"}
        assert obj["urgency"] in {"low", "medium", "high"}
        labels[obj["product"]] += 1
    assert len(labels) == 5 and min(labels.values()) > 60


def test_preference_pairs_are_the_task_and_leak_into_no_sft_split(tmp_path):
    """chosen = the correct JSON of the task; rejected = a JSON with one field wrong (balanced), or prose; no pair
    asks what an SFT row asks, so after both are split no held-out pair was trained on by SFT."""
    from edgetune import pipeline
    from edgetune.align import prompts_seen_in
    from edgetune.config import DataConfig
    from edgetune.data import prepare
    from edgetune.recipes import DEMO_PAIRS

    assert pipeline.resolve_data(DEMO_PAIRS) == PAIRS
    pairs = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines()]
    sft_users = {json.loads(line)["messages"][1]["content"] for line in SHIPPED.read_text(encoding="utf-8").splitlines()}
    assert len(pairs) >= 200 and len({p["prompt"][1]["content"] for p in pairs}) == len(pairs)
    assert not sft_users & {p["prompt"][1]["content"] for p in pairs}
    kinds, chosen, rejected = Counter(), Counter(), Counter()
    for p in pairs:
        assert [m["role"] for m in p["prompt"]] == ["system", "user"]
        good = json.loads(p["chosen"])
        assert list(good) == ["category", "urgency", "product"] and p["chosen"] == json.dumps(good, separators=(",", ":"))
        try:
            bad = json.loads(p["rejected"])
        except ValueError:
            kinds["prose"] += 1
            continue
        wrong = [k for k in good if good[k] != bad[k]]
        assert len(wrong) == 1 and list(bad) == list(good)  # one field off, same shape
        kinds[wrong[0]] += 1
        chosen[wrong[0], good[wrong[0]]] += 1
        rejected[wrong[0], bad[wrong[0]]] += 1
    # mostly the fields a small tuned model gets wrong (urgency, category), some product and prose
    assert kinds["urgency"] > kinds["category"] > kinds["product"] > 0 and kinds["prose"] >= len(pairs) // 10
    # every wrong label is rejected about as often as it is chosen in the pairs that change it, so no
    # label is a shortcut DPO could learn ("avoid medium") instead of reading the message
    assert set(chosen) == set(rejected) and all(abs(chosen[k] - rejected[k]) <= 1 for k in chosen)
    # prepared the way the align stage prepares them: the held-out pairs' prompts are in no SFT split
    prepare(SHIPPED, tmp_path / "sft", DataConfig(path=str(SHIPPED)))
    prepare(PAIRS, tmp_path / "pairs", DataConfig(path=str(PAIRS), format="preference"))
    for split in ("train", "valid", "test"):
        assert prompts_seen_in(tmp_path / "pairs" / "test.jsonl", tmp_path / "sft" / f"{split}.jsonl") == 0
    assert prompts_seen_in(tmp_path / "sft" / "test.jsonl", tmp_path / "sft" / "test.jsonl") > 0  # the check can fire
