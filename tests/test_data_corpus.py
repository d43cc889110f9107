"""The broken-record corpus: every bad line is reported with file:line and a reason, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetune.cli import cli
from edgetune.config import DataConfig
from edgetune.data import prepare, validate

CORPUS = Path(__file__).parent / "data_corpus"
EXPECTED = json.loads((CORPUS / "broken.expected.json").read_text())


def test_corpus_has_at_least_30_broken_records():
    assert len(EXPECTED) >= 30
    raw = (CORPUS / "broken.jsonl").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # BOM
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")  # non-UTF-8 bytes are really there
    assert max(len(line) for line in raw.splitlines()) > 100_000  # a huge line


def test_every_broken_line_is_rejected_with_its_reason(tokenizer_dir, tmp_path):
    card = prepare(CORPUS / "broken.jsonl", tmp_path, DataConfig(), model_dir=tokenizer_dir)
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    got = {str(r["line"]): r["reason"] for r in rejects}
    assert got == EXPECTED
    assert all(r["source"].endswith("broken.jsonl") and r["detail"] for r in rejects)
    # nothing lost silently: every non-blank line is either written out or rejected
    n_lines = sum(1 for line in (CORPUS / "broken.jsonl").read_bytes().splitlines() if line.strip())
    assert card["counts"]["rows_read"] == n_lines
    assert card["counts"]["records_out"] + card["counts"]["rejected"] == n_lines
    out_rows = sum(len((tmp_path / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "valid", "test"))
    assert out_rows == card["counts"]["records_out"] == 6
    # the good rows are valid mlx-lm chat rows
    for s in ("train", "valid", "test"):
        for line in (tmp_path / f"{s}.jsonl").read_text().splitlines():
            row = json.loads(line)
            assert row["messages"][-1]["role"] == "assistant"
            assert all("\r" not in m["content"] for m in row["messages"])


def test_validate_cli_reports_file_line_and_exits_1(tmp_path):
    res = CliRunner().invoke(cli, ["data", "validate", str(CORPUS / "broken.jsonl"), "--json"])
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    rep = json.loads(res.output)
    # duplicates and over-length are policy (counted), not record problems
    problems = {str(i["line"]): i["reason"] for i in rep["issues"]}
    assert problems == {k: v for k, v in EXPECTED.items() if v not in ("duplicate", "overlength")}
    assert all(p.startswith(str(CORPUS / "broken.jsonl") + ":") for p in rep["problems"])
    assert rep["duplicates"]["exact"] == 2


def test_huge_line_is_reported_not_loaded(tmp_path):
    from edgetune.data import load

    p = tmp_path / "huge.jsonl"
    with open(p, "w") as f:
        f.write(json.dumps({"text": "ok"}) + "\n")
        f.write('{"text": "' + "x" * (load.MAX_LINE_BYTES + 10) + '"}\n')
        f.write(json.dumps({"text": "after"}) + "\n")
    rep = validate(p, DataConfig())
    assert rep.exit_code == 1
    assert rep.problems == [f"{p}:2: line is {load.MAX_LINE_BYTES + 22:,} bytes (limit {load.MAX_LINE_BYTES:,})"]
    assert rep.usable == 2


def test_json_array_keeps_line_numbers_and_stops_at_syntax_error(tmp_path):
    rep = validate(CORPUS / "array.json", DataConfig())
    assert rep.exit_code == 1 and rep.usable == 2
    assert [p.split(" ")[0] for p in rep.problems] == [f"{CORPUS / 'array.json'}:5", f"{CORPUS / 'array.json'}:6:"]


def test_unreadable_inputs_exit_2(tmp_path):
    assert validate(CORPUS / "utf16.jsonl", DataConfig()).exit_code == 2
    assert validate(tmp_path / "missing.jsonl", DataConfig()).exit_code == 2
    (tmp_path / "x.txt").write_text("hello")
    assert validate(tmp_path / "x.txt", DataConfig()).exit_code == 2
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    rep = validate(tmp_path / "bad.parquet", DataConfig())
    assert rep.exit_code == 2 and "bad.parquet" in rep.fatal
    res = CliRunner().invoke(cli, ["data", "validate", str(tmp_path / "bad.parquet")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["data", "prepare", str(tmp_path / "bad.parquet"), "-o", str(tmp_path / "o")])
    assert res.exit_code != 0 and not isinstance(res.exception, (TypeError, ValueError, KeyError))


def test_csv_rows_report_the_empty_cell():
    rep = validate(CORPUS / "table.csv", DataConfig())
    assert rep.usable == 3
    assert rep.problems == [f"{CORPUS / 'table.csv'}:5 [output]: missing field 'output'"]


def test_hub_id_offline_is_a_clear_unreadable_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rep = validate("nobody/no-such-dataset-xyz", DataConfig())
    assert rep.exit_code == 2 and "not a local path" in rep.fatal


def test_seeded_garbage_never_raises_anything_but_edgetune_errors(tmp_path):
    """Random bytes and random JSON shapes: every line ends up reported, nothing crashes."""
    import random

    from edgetune.errors import EdgetuneError

    rng = random.Random(0)
    atoms = [None, True, 0, -1.5, "", " ", "x", [], {}, [1], {"a": 1}, "\u200b", "\x00"]
    keys = ["messages", "conversations", "role", "content", "from", "value", "text", "prompt", "completion",
            "instruction", "input", "output", "chosen", "rejected", "tools"]

    def junk(depth=0):
        r = rng.random()
        if depth > 3 or r < 0.3:
            return rng.choice(atoms)
        if r < 0.6:
            return [junk(depth + 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(keys): junk(depth + 1) for _ in range(rng.randint(0, 4))}

    with open(tmp_path / "fuzz.jsonl", "wb") as f:
        for i in range(300):
            if i % 5 == 0:
                f.write(bytes(rng.randrange(256) for _ in range(rng.randint(1, 40))).replace(b"\n", b"") + b"\n")
            else:
                f.write(json.dumps(junk()).encode() + b"\n")
    rep = validate(tmp_path / "fuzz.jsonl", DataConfig())
    assert rep.exit_code in (1, 2) and rep.rows >= 290
    assert rep.usable + len(rep.problems) + rep.duplicates["exact"] == rep.rows
    # nothing in the fuzz is usable: prepare refuses with the reasons and keeps every rejected line
    with pytest.raises(EdgetuneError, match=r"No usable records in .*fuzz\.jsonl \(300 rows read; top reasons: ") as exc:
        prepare(tmp_path / "fuzz.jsonl", tmp_path / "o", DataConfig())
    assert exc.value.where == str(tmp_path / "o" / "rejects.jsonl")
    assert len((tmp_path / "o" / "rejects.jsonl").read_text(encoding="utf-8").splitlines()) == len(rep.problems)
