"""prepare/validate end to end on small generated datasets (formats, dedup, split, leakage, PII, tokens)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetune.cli import cli
from edgetune.config import DataConfig
from edgetune.data import dominant_system_prompt, encode_example, load_tokenizer, prepare, validate
from edgetune.data.clean import redact_pii
from edgetune.data.formats import normalise

WORDS = ("alpha beta gamma delta river mountain cloud engine printer invoice refund password account "
         "shipping order delay broken screen battery charger warranty manual update install").split()


def chat(i: int, rng: random.Random, system: str | None = "You are a support bot.", user_id: str | None = None) -> dict:
    q = " ".join(rng.choice(WORDS) for _ in range(12)) + f" ticket {i}?"
    a = " ".join(rng.choice(WORDS) for _ in range(15)) + f" resolved {i}."
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]
    row = {"messages": msgs}
    if user_id is not None:
        row["user_id"] = user_id
    return row


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_format_normalises_to_messages():
    assert normalise({"instruction": "Sum", "input": "1, 2", "output": "3"}).messages == [
        {"role": "user", "content": "Sum\n\n1, 2"}, {"role": "assistant", "content": "3"}]
    assert normalise({"instruction": "Hi", "response": "Hello"}).messages[1] == {"role": "assistant", "content": "Hello"}
    sg = normalise({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]})
    assert [m["role"] for m in sg.messages] == ["system", "user", "assistant"] and sg.fmt == "sharegpt"
    pc = normalise({"prompt": "P", "completion": "C"})
    assert pc.kind == "completion" and pc.to_row("completion") == {"prompt": "P", "completion": "C"}
    assert normalise({"text": "T"}).to_row("text") == {"text": "T"}
    pref = normalise({"prompt": "P", "chosen": "good", "rejected": "bad"})
    assert pref.kind == "preference" and pref.to_row("preference") == {"prompt": "P", "chosen": "good", "rejected": "bad"}
    tools = [{"type": "function", "function": {"name": "f"}}]
    c = normalise({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": tools})
    # tools are kept in canonical form (edgetune.data.tools): description and parameters always present
    assert c.to_row("chat")["tools"] == [{"type": "function", "function": {
        "name": "f", "description": "", "parameters": {"type": "object", "properties": {}}}}]
    parts = normalise({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                                    {"role": "assistant", "content": "c"}]})
    assert parts.messages[0]["content"] == "ab"
    forced = normalise({"prompt": "P", "completion": "C"}, "completion")
    assert forced.kind == "completion"


def test_prepare_is_byte_identical_and_seed_dependent(tmp_path):
    rng = random.Random(0)
    src = write_jsonl(tmp_path / "in.jsonl", [chat(i, rng) for i in range(300)])
    cfg = DataConfig(dedup="near", seed=7)
    prepare(src, tmp_path / "a", cfg)
    prepare(src, tmp_path / "b", cfg)
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl", "rejects.jsonl", "data_card.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    card = prepare(src, tmp_path / "c", DataConfig(dedup="near", seed=8))
    assert (tmp_path / "c" / "test.jsonl").read_bytes() != (tmp_path / "a" / "test.jsonl").read_bytes()
    assert card["splits"]["train"] + card["splits"]["valid"] + card["splits"]["test"] == 300
    assert card["splits"]["valid"] == 30 and card["splits"]["test"] == 30


def test_exact_and_near_duplicates_are_removed_and_reported(tmp_path):
    rng = random.Random(1)
    rows = [chat(i, rng) for i in range(100)]
    exact = [json.loads(json.dumps(rows[i])) for i in range(5)]
    near = []
    for i in range(10, 20):  # one word changed in a long answer: Jaccard well above 0.8
        r = json.loads(json.dumps(rows[i]))
        r["messages"][2]["content"] += " " + " ".join(WORDS) + " thanks"
        rows[i]["messages"][2]["content"] += " " + " ".join(WORDS)
        near.append(r)
    src = write_jsonl(tmp_path / "in.jsonl", rows + exact + near)
    card = prepare(src, tmp_path / "near", DataConfig(dedup="near"))
    assert card["dedup"]["exact_removed"] == 5 and card["dedup"]["near_removed"] == 10
    rejects = read_jsonl(tmp_path / "near" / "rejects.jsonl")
    assert sorted(r["line"] for r in rejects if r["reason"] == "near_duplicate") == list(range(106, 116))
    assert all("of " + str(src) + ":" in r["detail"] for r in rejects)
    card = prepare(src, tmp_path / "exact", DataConfig(dedup="exact"))
    assert card["dedup"]["exact_removed"] == 5 and card["dedup"]["near_removed"] == 0
    # near-duplicates that stayed (dedup=exact) may not leak across splits: the leakage check drops them
    out = sum(card["splits"][s] for s in ("train", "valid", "test"))
    assert out == 110 - card["leakage"]["near_removed"]
    rep = validate(src, DataConfig(dedup="near"))
    assert rep.exit_code == 0 and rep.duplicates["exact"] == 5 and rep.duplicates["near"] == 10


def test_group_split_and_enforced_leakage(tmp_path):
    rng = random.Random(2)
    rows = [chat(i, rng, user_id=f"u{i % 40}") for i in range(400)]
    # the same conversation under two users, with dedup off: grouping alone would let it leak
    for i in range(0, 60):
        rows.append({**json.loads(json.dumps(rows[i])), "user_id": f"other{i}"})
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    card = prepare(src, tmp_path / "o", DataConfig(group_by="user_id", dedup="off", valid_ratio=0.15, test_ratio=0.15))
    splits = {s: read_jsonl(tmp_path / "o" / f"{s}.jsonl") for s in ("train", "valid", "test")}
    # which user ended where: map each output row back to its source rows by content
    owners: dict[str, set] = {}
    for r in rows:
        owners.setdefault(json.dumps(r["messages"]), set()).add(r["user_id"])
    where: dict[str, set] = {}
    for s, rs in splits.items():
        for r in rs:
            us = owners[json.dumps(r["messages"])]
            if len(us) == 1:  # contents shared by two users are covered by the leakage asserts below
                where.setdefault(next(iter(us)), set()).add(s)
    assert all(len(v) == 1 for v in where.values()), "a user spans two splits"
    train = {json.dumps(r["messages"]) for r in splits["train"]}
    assert not any(json.dumps(r["messages"]) in train for s in ("valid", "test") for r in splits[s])
    assert card["leakage"]["exact_removed"] > 0 and card["splits"]["groups"] == 100
    rejects = read_jsonl(tmp_path / "o" / "rejects.jsonl")
    assert {r["reason"] for r in rejects} == {"leakage"}
    # a record without the group field is rejected, not guessed
    write_jsonl(tmp_path / "g.jsonl", rows[:50] + [chat(999, rng)])
    card = prepare(tmp_path / "g.jsonl", tmp_path / "g", DataConfig(group_by="user_id"))
    assert card["counts"]["rejected_by_reason"] == {"missing_group_field": 1}


def test_pii_redaction_counts_per_kind(tmp_path):
    counts: dict = {}
    from collections import Counter

    counts = Counter()
    text = ("mail bob.smith@example.co.uk or call +1 415-555-0132 / (212) 555-7890, card 4111 1111 1111 1111, "
            "ssn 123-45-6789, server 192.168.1.20; order 1234567890123 and year 2024 stay")
    out = redact_pii(text, counts)
    assert out == ("mail [EMAIL] or call [PHONE] / [PHONE], card [CARD], ssn [SSN], server [IP]; "
                   "order 1234567890123 and year 2024 stay")
    assert dict(counts) == {"email": 1, "phone": 2, "card": 1, "ssn": 1, "ip": 1}
    rng = random.Random(8)
    rows = [chat(i, rng) for i in range(20)]
    for i, r in enumerate(rows):
        r["messages"][1]["content"] += f" I am x{i}@corp.com, ip 10.0.0.{i}"
    src = write_jsonl(tmp_path / "pii.jsonl", rows)
    card = prepare(src, tmp_path / "o", DataConfig(redact_pii=True))
    assert card["cleaning"]["pii_redacted"]["email"] == 20 and card["cleaning"]["pii_redacted"]["ip"] == 20
    body = "".join(f.read_text() for f in (tmp_path / "o").glob("*.jsonl") if f.name != "rejects.jsonl")
    assert card["counts"]["records_out"] == 20
    assert "@corp.com" not in body and body.count("[EMAIL], ip [IP]") == 20


@pytest.mark.parametrize("policy,kept,reason", [("drop", 20, "overlength"), ("truncate", 21, None), ("keep", 22, None)])
def test_overlength_policies_with_the_model_tokenizer(tokenizer_dir, tmp_path, policy, kept, reason):
    rng = random.Random(3)
    rows = [chat(i, rng) for i in range(20)]
    rows.append({"messages": [{"role": "user", "content": "short"}, {"role": "assistant", "content": "word " * 300}]})
    rows.append({"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "short"}]})
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    card = prepare(src, tmp_path / policy, DataConfig(max_seq_len=128, overlength=policy), model_dir=tokenizer_dir)
    assert card["counts"]["records_out"] == kept and card["tokens"]["overlength"] == 2
    reasons = {r["reason"] for r in read_jsonl(tmp_path / policy / "rejects.jsonl")}
    if policy == "drop":
        assert reasons == {"overlength"}
    elif policy == "truncate":  # the prompt alone fills the budget: nothing left to learn
        assert reasons == {"prompt_too_long"} and card["tokens"]["truncated_at_train_time"] == 1
    else:
        assert reasons == set()
    tok = load_tokenizer(tokenizer_dir)
    # the card's token counts are what training will see
    train = read_jsonl(tmp_path / policy / "train.jsonl")
    lengths = sorted(len(encode_example(tok, r).input_ids) for r in train)
    assert card["tokens"]["per_split"]["train"]["max"] == lengths[-1]
    assert card["tokens"]["per_split"]["train"]["total"] == sum(lengths)
    assert card["tokens"]["chat_template_sha256"] and card["tokens"]["eos_token"] == "<|im_end|>"


def test_folder_parquet_csv_and_save_to_disk(tmp_path):
    import datasets

    rng = random.Random(4)
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [chat(i, rng) for i in range(10)])
    datasets.Dataset.from_list([chat(i, rng) for i in range(10, 20)]).to_parquet(str(folder / "b.parquet"))
    (folder / "c.csv").write_text("instruction,input,output\nSay hi,,hi\nAdd,1 and 2,3\n")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "ignored layout"}]),
                          "x": datasets.Dataset.from_list([chat(i, rng) for i in range(20, 25)])}
                         ).save_to_disk(str(folder / "saved"))
    card = prepare(folder, tmp_path / "o", DataConfig(valid_ratio=0.0, test_ratio=0.0))
    assert [Path(s["path"]).name for s in card["sources"]] == ["a.jsonl", "b.parquet", "c.csv", "saved"]
    assert card["formats"] == {"chat": 25, "completion": 1, "instruction": 2}
    assert card["counts"]["records_out"] == 27 and card["counts"]["rejected_by_reason"] == {"mixed_layout": 1}
    rej = read_jsonl(tmp_path / "o" / "rejects.jsonl")[0]
    assert rej["source"].endswith("saved[train]") and rej["line"] == 1
    assert all(len(s["sha256"]) == 64 for s in card["sources"])
    # a save_to_disk folder passed directly
    single = tmp_path / "single"
    datasets.Dataset.from_list([chat(i, rng) for i in range(8)]).save_to_disk(str(single))
    assert validate(single, DataConfig()).usable == 8


def test_completion_layout_and_dominant_system_prompt(tmp_path):
    src = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(30)])
    prepare(src, tmp_path / "pc", DataConfig())
    assert set(read_jsonl(tmp_path / "pc" / "train.jsonl")[0]) == {"prompt", "completion"}
    assert dominant_system_prompt(tmp_path / "pc" / "train.jsonl") is None
    rng = random.Random(5)
    rows = [chat(i, rng, system="Answer in JSON.") for i in range(30)] + [chat(i, rng, system=None) for i in range(30, 40)]
    prepare(write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "c", DataConfig())
    assert dominant_system_prompt(tmp_path / "c" / "train.jsonl") == "Answer in JSON."
    rows = [chat(i, rng, system=f"sys {i % 4}") for i in range(40)]
    prepare(write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "d", DataConfig())
    assert dominant_system_prompt(tmp_path / "d" / "train.jsonl") is None


def test_preference_layout(tmp_path):
    rows = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad {i}."} for i in range(20)]
    card = prepare(write_jsonl(tmp_path / "p.jsonl", rows), tmp_path / "p", DataConfig())
    assert card["layout"] == "preference"
    assert set(read_jsonl(tmp_path / "p" / "train.jsonl")[0]) == {"prompt", "chosen", "rejected"}


def test_cli_prepare_and_validate(tokenizer_dir, tmp_path):
    rng = random.Random(6)
    src = write_jsonl(tmp_path / "in.jsonl", [chat(i, rng) for i in range(50)])
    runner = CliRunner()
    res = runner.invoke(cli, ["data", "prepare", str(src), "-o", str(tmp_path / "o"), "--model", str(tokenizer_dir),
                              "--dedup", "near", "--seed", "3", "--valid-ratio", "0.2", "--redact-pii"])
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "o" / "data_card.json").read_text())
    assert card["config"]["seed"] == 3 and card["splits"]["valid"] == 10 and card["config"]["redact_pii"] is True
    res = runner.invoke(cli, ["data", "validate", str(src), "--model", str(tokenizer_dir)])
    assert res.exit_code == 0, res.output
    assert "no record problems" in res.output and "p95" in res.output
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tokenizer_dir}\ndata:\n  dedup: off\n  seed: 11\n")
    res = runner.invoke(cli, ["data", "prepare", str(src), "-o", str(tmp_path / "r"), "--config", str(recipe), "--json"])
    assert res.exit_code == 0, res.output
    card = json.loads(res.output)
    assert card["config"]["dedup"] == "off" and card["config"]["seed"] == 11 and card["tokens"]["model"] == str(tokenizer_dir)


def test_cli_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = "import sys, edgetune.cli.data; print(sorted(m for m in ('torch','transformers','datasets','datasketch','mlx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.mlx
def test_mlx_lm_reads_the_prepared_splits(tokenizer_dir, tmp_path):
    """The splits are in mlx-lm's layout: its own loader tokenizes them to our ids."""
    from types import SimpleNamespace

    pytest.importorskip("mlx_lm")
    from mlx_lm.tuner.datasets import load_local_dataset

    rng = random.Random(7)
    tok = load_tokenizer(tokenizer_dir)
    for name, rows in {
        "chat": [chat(i, rng) for i in range(30)],
        "completion": [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(30)],
        "text": [{"text": f"some text {i}"} for i in range(30)],
    }.items():
        out = tmp_path / name
        prepare(write_jsonl(tmp_path / f"{name}.jsonl", rows), out, DataConfig(valid_ratio=0.2, test_ratio=0.0))
        assert not (out / "test.jsonl").exists()
        train, valid, test = load_local_dataset(out, tok, SimpleNamespace(mask_prompt=False))
        assert len(train) == 24 and len(valid) == 6 and len(test) == 0
        mine = [encode_example(tok, r).input_ids for r in read_jsonl(out / "train.jsonl")]
        assert [list(train.process(train[i])[0]) for i in range(len(train))] == mine


def test_outputs_do_not_depend_on_python_hash_seed(tmp_path):
    """Sets and dicts inside dedup must not leak PYTHONHASHSEED into the outputs."""
    import os
    import subprocess
    import sys

    rng = random.Random(9)
    rows = [chat(i, rng) for i in range(200)]
    for i in range(0, 40, 2):  # near-duplicates, so the LSH path decides something
        r = json.loads(json.dumps(rows[i]))
        r["messages"][2]["content"] += " extra"
        rows.append(r)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    code = ("import sys; from edgetune.config import DataConfig; from edgetune.data import prepare; "
            "prepare(sys.argv[1], sys.argv[2], DataConfig(dedup='near'))")
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / seed)], check=True, env=env)
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl", "rejects.jsonl", "data_card.json"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name
    assert json.loads((tmp_path / "1" / "data_card.json").read_text())["dedup"]["near_removed"] == 20


def test_shared_system_prompt_does_not_make_short_examples_near_duplicates(tmp_path):
    # long and varied (60 distinct rules): its shingles would dominate the Jaccard if counted
    system = "Triage the support message. " + " ".join(f"rule {i}: {WORDS[i % len(WORDS)]}." for i in range(60))
    products = ["cloudsync", "paywell", "taskboard", "mailpilot", "homehub"]
    rows = [{"messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": f"I received the wrong item instead of the {p} app!"},
        {"role": "assistant", "content": json.dumps({"category": "shipping", "product": p})},
    ]} for p in products]
    card = prepare(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "o", DataConfig(dedup="near"))
    assert card["dedup"]["near_removed"] == 0 and card["counts"]["records_out"] == 5
