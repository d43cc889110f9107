"""`--quant auto`: a ladder of types measured against f16, the smallest passing one shipped; the same
through `edgetune export` and `edgetune run` (export.imatrix: auto computed from the train split)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from edgetune import pipeline, registry
from edgetune.cli import cli
from edgetune.io import read_json
from edgetune.quant.autoquant import LadderRow, choose
from edgetune.runfolder import RunFolder

SHORT = "q8_0,q4_k_m,q3_k_m,iq3_m"


def _cli(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


def test_choose_takes_the_smallest_file_inside_the_gate():
    rows = [LadderRow("q8_0", 10, 8.5, 0.001, 0.99, 1, False), LadderRow("q4_k_m", 6, 4.9, 0.02, 0.93, 1, True),
            LadderRow("q3_k_m", 5, 3.9, 0.05, 0.91, 1, True), LadderRow("iq3_m", 4.5, 3.7, 0.02, 0.85, 1, True)]
    assert choose(rows, 0.03, 0.90).qtype == "q4_k_m"  # q3_k_m fails on KL, iq3_m on top-1
    assert [r.passed for r in rows] == [True, True, False, False]
    assert choose(rows, 1.0, 0.0).qtype == "iq3_m"
    assert choose(rows, 1e-5, 0.999) is None


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    p = tmp_path_factory.mktemp("aqdata") / "calib.jsonl"
    p.write_text("".join(pipeline.demo_data_path().read_text(encoding="utf-8").splitlines(keepends=True)[:24]))
    return p


def test_cli_quant_auto_ships_the_smallest_type_that_passes(tiny256, calib, tmp_path):
    loose = tmp_path / "loose"
    r = _cli("export", tiny256, "--quant", "auto", "--calib", calib, "--max-kl", "100", "--min-top1", "0",
             "--ladder", SHORT, "-o", loose, "--name", "t", "--no-verify")
    rep = read_json(loose / "quant-auto.json")
    rows = rep["rows"]
    assert [x["qtype"] for x in sorted(rows, key=lambda x: -x["size_mb"])] == [x["qtype"] for x in rows]
    assert {x["qtype"] for x in rows} == set(SHORT.split(","))  # iq3_m too: the imatrix was computed from --calib
    assert all(x["imatrix"] for x in rows if x["qtype"] != "q8_0")
    smallest = min(rows, key=lambda x: x["size_mb"])["qtype"]
    assert rep["chosen"] == smallest and smallest in r.output
    assert sorted(p.name for p in loose.glob("*.gguf")) == sorted(["t-f16.gguf", f"t-{smallest}.gguf", "imatrix.gguf"])
    assert not list(loose.glob(".*ladder*"))  # the other ladder files are gone
    assert (loose / "quant-auto.png").read_bytes()[:4] == b"\x89PNG"
    assert "**chosen**" in (loose / "quant-auto.md").read_text()
    assert read_json(loose / "imatrix.json")["data"] == str(calib)

    # a gate between the measured KLs: the choice moves to the smallest type under it
    kls = sorted({x["mean_kl"] for x in rows})
    gate = (kls[1] + kls[2]) / 2
    strict = tmp_path / "strict"
    _cli("export", tiny256, "--quant", "auto", "--calib", calib, "--max-kl", gate, "--min-top1", "0", "-o", strict,
         "--ladder", SHORT, "--name", "t", "--no-verify")
    rep2 = read_json(strict / "quant-auto.json")
    ok = [x for x in rep2["rows"] if x["mean_kl"] <= gate]
    assert rep2["chosen"] == min(ok, key=lambda x: x["size_mb"])["qtype"]
    assert (strict / f"t-{rep2['chosen']}.gguf").is_file()

    # nothing passes: a clear error, the table still written
    r = CliRunner().invoke(cli, ["export", str(tiny256), "--quant", "auto", "--max-kl", "0", "--min-top1", "1", "--ladder", "q8_0,iq3_m",
                                 "-o", str(tmp_path / "none"), "--name", "t", "--no-verify"])
    assert r.exit_code != 0 and "no type passed the gate" in str(r.exception) + r.output
    rep3 = read_json(tmp_path / "none" / "quant-auto.json")
    assert rep3["chosen"] is None and [x["qtype"] for x in rep3["rows"]] == ["q8_0"]  # iq3_m: no imatrix without --calib
    assert "Not tried without an importance matrix: iq3_m" in rep3["reason"]


def test_run_honours_imatrix_auto_and_quant_auto_like_the_cli(tiny256, tmp_path, monkeypatch):
    lines = pipeline.demo_data_path().read_text(encoding="utf-8").splitlines(keepends=True)[:60]
    (tmp_path / "tickets.jsonl").write_text("".join(lines), encoding="utf-8")
    raw = {
        "name": "tiny", "model": str(tiny256), "output": str(tmp_path / "runs"),
        "data": {"path": str(tmp_path / "tickets.jsonl"), "max_seq_len": 256},
        "train": {"backend": "torch", "iters": 2, "batch_size": 2, "max_seq_len": 256, "rank": 4, "alpha": 8,
                  "eval_every": 0, "save_every": 2, "num_threads": 1},
        "export": {"quants": ["auto"], "max_kl": 100.0, "min_top1": 0.0, "ladder": ["q8_0", "q4_k_m", "iq3_m"], "verify": False},
        "ollama": {"name": "tiny-auto"},
        "eval": {"limit": 2, "max_tokens": 4, "regression": False},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    monkeypatch.setenv("EDGETUNE_HOME", str(tmp_path / "home"))
    _cli("run", tmp_path / "tiny.yaml")
    run = RunFolder(tmp_path / "runs" / "tiny")
    summary = run.manifest()["stages"]["export"]["summary"]
    assert summary["auto"]["chosen"] == "iq3_m"  # the smallest of the ladder under a gate everything passes
    assert summary["imatrix"]["data"] == str(run.split("train"))  # export.imatrix: auto, from the train split
    assert summary["imatrix"]["tokens"] > 0 and set(summary["gguf"]) == {"f16", "iq3_m"}
    assert read_json(run.gguf_dir / "quant-auto.json")["heldout"] == "held-out split"
    assert run.modelfile_quant == "iq3_m" and run.export_types == ["f16", "iq3_m"]
    assert "FROM ./tiny-auto-iq3_m.gguf" in run.modelfile.read_text() or "tiny-auto-iq3_m.gguf" in run.modelfile.read_text()
    (entry,) = registry.list_entries()
    assert "tiny-auto-iq3_m.gguf" in entry.manifest["artifacts"]
    assert "FROM ./tiny-auto-iq3_m.gguf" in (entry.path / "Modelfile").read_text()

    # `edgetune export RUN` (the same settings from the run folder) gives the same imatrix and the same file
    out = tmp_path / "cli"
    _cli("export", run.root, "-o", out)
    assert (out / "imatrix.gguf").read_bytes() == (run.gguf_dir / "imatrix.gguf").read_bytes()
    assert read_json(out / "quant-auto.json")["chosen"] == "iq3_m"
    assert (out / "tiny-auto-iq3_m.gguf").read_bytes() == run.gguf("iq3_m").read_bytes()
    assert Path(summary["auto"]["table"]).is_file()
