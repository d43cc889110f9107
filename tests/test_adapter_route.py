"""export.route: adapter (issue 26): the adapter shipped on the unmodified source GGUF a base was imported from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgetune.errors import EdgetuneError


def _record(d, src, kind="gguf", name=None):
    d.mkdir(parents=True, exist_ok=True)
    (d / "import.json").write_text(json.dumps({"source": {"kind": kind, "path": str(src), "name": name,
                                                          "sha256": "x", "file_type": "Q8_0"}}))
    return d


def test_source_record_and_refusals(tmp_path):
    from edgetune.export.source_route import require_source
    from edgetune.model_dir import read_source

    assert read_source(tmp_path) is None
    with pytest.raises(EdgetuneError, match="was not imported") as ei:
        require_source(tmp_path)
    assert "models import" in ei.value.fix
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF")
    d = _record(tmp_path / "a", src)
    assert require_source(d).from_line == str(src)
    o = _record(tmp_path / "o", src, "ollama", "qwen2.5:0.5b")
    assert require_source(o).from_line == "qwen2.5:0.5b"  # FROM the model the user already runs
    src.unlink()
    with pytest.raises(EdgetuneError, match="is gone"):
        require_source(d)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "import.json").write_text("{}")
    with pytest.raises(EdgetuneError, match="not an import record"):
        read_source(tmp_path / "b")


def test_registry_keeps_from_and_rebases_the_adapter():
    from edgetune.registry import rebase_modelfile

    text = "FROM qwen2.5:0.5b\nADAPTER /runs/x/gguf/x-adapter.gguf\nTEMPLATE \"\"\"{{ .Prompt }}\"\"\"\n"
    out = rebase_modelfile(text, "x-adapter.gguf", adapter=True)
    assert out.splitlines()[:2] == ["FROM qwen2.5:0.5b", "ADAPTER ./x-adapter.gguf"]
    assert rebase_modelfile("FROM /a/b.gguf\n", "b.gguf").startswith("FROM ./b.gguf")


def test_modelfile_from_an_ollama_name(tiny_llama_dir, tmp_path, make_lora_gguf):
    from edgetune.export.gguf import convert
    from edgetune.ollama.modelfile import build_modelfile

    base = convert(tiny_llama_dir, tmp_path / "base.gguf", "f16", verify=False, show_progress=False)
    lora = make_lora_gguf(tmp_path / "a.gguf", layers=2, seed=1, hidden=64)
    text, check = build_modelfile(base, tmp_path / "ollama", "t", adapter_gguf=lora, from_name="qwen2.5:0.5b")
    lines = text.splitlines()
    assert "FROM qwen2.5:0.5b" in lines and any(x.startswith("ADAPTER ") and x.endswith("a.gguf") for x in lines)
    assert check is not None and check.ok  # the template is still checked against the GGUF's own


def test_route_config_and_refusal_with_align(tmp_path):
    from edgetune.config import ExportConfig

    assert ExportConfig().route == "merge" and ExportConfig(route="adapter").route == "adapter"
    with pytest.raises(EdgetuneError, match="export.route"):
        ExportConfig(route="both")


def test_a_run_on_an_imported_model_ships_the_adapter_on_the_source(tiny_llama_dir, tmp_path, monkeypatch):
    """Import a Q8_0 GGUF, run the pipeline with export.route: adapter: the adapter GGUF is checked on
    the unmodified source, the Modelfile says FROM the source + ADAPTER, eval scores the source with
    the adapter, and the registry entry keeps FROM and carries the adapter."""
    import yaml
    from click.testing import CliRunner

    from edgetune import pipeline
    from edgetune.cli import cli
    from edgetune.export.gguf import convert
    from edgetune.io import read_json
    from edgetune.model_import import import_model
    from edgetune.runfolder import RunFolder

    monkeypatch.setenv("EDGETUNE_HOME", str(tmp_path / "home"))
    source = convert(tiny_llama_dir, tmp_path / "tiny-q8_0.gguf", "q8_0", verify=False, show_progress=False)
    imported = import_model(source, tmp_path / "imported", verify=False)
    lines = pipeline.demo_data_path().read_text(encoding="utf-8").splitlines(keepends=True)[:40]
    (tmp_path / "tickets.jsonl").write_text("".join(lines), encoding="utf-8")
    raw = {"name": "routed", "model": str(imported), "output": str(tmp_path / "runs"),
           "data": {"path": str(tmp_path / "tickets.jsonl"), "max_seq_len": 256},
           "train": {"backend": "torch", "iters": 2, "batch_size": 2, "max_seq_len": 256, "rank": 4, "alpha": 8,
                     "learning_rate": 5e-3, "eval_every": 0, "save_every": 2, "num_threads": 1},
           "export": {"route": "adapter"}, "ollama": {"name": "routed"},
           "eval": {"limit": 2, "max_tokens": 4, "regression": False}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "r.yaml")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    run = RunFolder(tmp_path / "runs" / "routed")
    summary = read_json(run.root / "manifest.json")["stages"]["export"]["summary"]
    assert summary["route"] == "adapter" and summary["source"]["file_type"] == "Q8_0"
    v = summary["verify"]["source+adapter vs imported+adapter"]
    assert summary["verify"]["passed"] and v["top1"] >= 0.9 and v["positions"] > 0
    assert run.adapter_gguf.is_file() and not run.gguf("q4_k_m").exists()  # nothing merged or requantized
    modelfile = run.modelfile.read_text(encoding="utf-8").splitlines()
    assert f"FROM {source}" in modelfile and any(x.startswith("ADAPTER ") for x in modelfile)
    report = read_json(run.eval_report("json"))
    row = next(m for m in report["models"] if m["name"] == "q8_0+adapter")
    assert row["spec"].endswith(f"+adapter:{run.adapter_gguf}")
    entry = read_json(run.root / "manifest.json")["stages"]["register"]["summary"]["path"]
    text = (Path(entry) / "Modelfile").read_text(encoding="utf-8")
    assert f"FROM {source}" in text and f"ADAPTER ./{run.adapter_gguf.name}" in text
    assert (Path(entry) / run.adapter_gguf.name).is_file()
    # the standalone command on the run folder writes the same Modelfile as the stage
    before = run.modelfile.read_text(encoding="utf-8")
    r = CliRunner().invoke(cli, ["ollama", str(run.root)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert run.modelfile.read_text(encoding="utf-8") == before


def test_the_plan_has_no_imatrix_on_the_adapter_route():
    from edgetune import pipeline, stageplan

    def stages(route):
        cfg = pipeline.load_recipe("mac-lora-7b", [f"export.route={route}"])  # a known shape: no model needed
        return {c.stage for c in stageplan.plan_stages(cfg, None, stageplan.TARGETS["mac-16gb"]).costs}

    assert "imatrix" in stages("merge") and "imatrix" not in stages("adapter")
