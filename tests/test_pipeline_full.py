"""Every stage on a tiny random model: run folder layout, registry entry, re-runs register nothing new."""

from __future__ import annotations

from click.testing import CliRunner

from edgetune import pipeline, registry
from edgetune.cli import cli
from edgetune.io import read_json


def test_all_stages_then_registry_once(tmp_path, tiny_llama_dir, tiny_recipe):
    recipe = tiny_recipe(tmp_path, tiny_llama_dir, n=60, iters=2)
    sets = ["eval.limit=2", "eval.max_tokens=4", "eval.regression=false"]
    args = ["run", str(recipe)] + [x for s in sets for x in ("--set", s)]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    run_dir = tmp_path / "runs" / "tiny"
    for rel in ("run.yaml", "manifest.json", "data/data_card.json", "train/adapter/adapter_model.safetensors",
                "fused/config.json", "gguf/tiny-triage-f16.gguf", "gguf/tiny-triage-q4_k_m.gguf",
                "ollama/Modelfile", "eval/report.json", "eval/report.md"):
        assert (run_dir / rel).is_file(), rel
    m = read_json(run_dir / "manifest.json")
    assert all(m["stages"][s]["status"] == "done" for s in pipeline.STAGES)
    assert set(m["stages"]["eval"]["summary"]["metrics"]) == {"base", "tuned", "q4_k_m"}
    (entry,) = registry.list_entries()
    assert entry.ref == "tiny-triage:v1" and "tuned" in entry.manifest["metrics"]
    assert entry.manifest["base_model"]["fingerprint"] == m["model_fingerprint"]
    assert entry.manifest["artifacts"]["tiny-triage-q4_k_m.gguf"]["sha256"]
    assert (entry.path / "Modelfile").read_text().count("FROM ./tiny-triage-q4_k_m.gguf") == 1
    assert "ollama create tiny-triage -f" in r.output and "registry: tiny-triage:v1" in r.output

    # forcing the last stage again finds the same artifacts: still one entry
    r2 = pipeline.run(pipeline.load_recipe(recipe, sets), from_stage="register")
    assert r2.ran == ["register"] and r2.stage("register")["created"] is False
    # a run folder is itself a recipe: continuing it skips everything
    r3 = pipeline.run(pipeline.load_recipe(run_dir))
    assert r3.ran == [] and len(registry.list_entries()) == 1
    # removing the entry and re-running registers a new, higher version (numbers are never reused)
    registry.remove("tiny-triage:v1")
    r4 = pipeline.run(pipeline.load_recipe(recipe, sets))
    assert r4.ran == ["register"] and r4.stage("register")["ref"] == "tiny-triage:v2"
