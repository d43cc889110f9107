"""The shipped demo dataset is exactly what scripts/make_demo_data.py writes, and has the promised shape."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "edgetune" / "resources" / "demo" / "support_tickets.jsonl"


def test_script_reproduces_shipped_file_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    assert (tmp_path / SHIPPED.name).read_bytes() == SHIPPED.read_bytes()


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
