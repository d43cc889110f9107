"""`edgetune quickstart` end to end on the real 135M demo model, with reduced steps (slow)."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from edgetune import pipeline, registry
from edgetune.cli import cli
from edgetune.io import read_json

pytestmark = pytest.mark.slow

FAST = ["train.iters=12", "eval.limit=6", "eval.max_tokens=32",
        # replay, the regression set and its gate are the recipe's; tests/test_replay_gates.py covers them
        "data.replay=0", "eval.regression=false", "eval.max_regression={}"]


def test_quickstart_end_to_end(tmp_path, monkeypatch, demo_model_dir):
    monkeypatch.chdir(tmp_path)
    args = ["quickstart"] + [x for s in FAST for x in ("--set", s)]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    run_dir = tmp_path / "runs" / "quickstart"

    # the summary names every artifact and the commands to try it
    for needle in ("support-triage-q4_k_m.gguf", "Modelfile", "ollama create support-triage -f", "edgetune chat",
                   "base", "tuned", "q4_k_m", "registry: support-triage:v1"):
        assert needle in r.output, needle

    manifest = read_json(run_dir / "manifest.json")
    assert {k: v["status"] for k, v in manifest["stages"].items()} == dict.fromkeys(pipeline.STAGES, "done")
    assert yaml.safe_load((run_dir / "run.yaml").read_text())["train"]["iters"] == 12

    # adapter + fused model
    adapter = run_dir / "train" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    assert (adapter / "adapter_model.safetensors").stat().st_size > 100_000
    from safetensors import safe_open

    fused_files = list((run_dir / "fused").glob("*.safetensors"))
    with safe_open(str(fused_files[0]), "np") as f:
        assert not any("lora" in k for k in f.keys())

    # GGUFs that llama.cpp loads and runs, answering the demo prompt through the chat template
    from llama_cpp import Llama

    system = pipeline.demo_data_path().read_text().splitlines()[0]
    msgs = json.loads(system)["messages"][:2]
    for t in ("f16", "q4_k_m"):
        path = run_dir / "gguf" / f"support-triage-{t}.gguf"
        llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False)
        out = llm.create_chat_completion(messages=msgs, max_tokens=24, temperature=0.0)
        assert out["choices"][0]["message"]["content"].strip()
        llm.close()

    # the Modelfile passes the template check against the fused model's chat template
    from edgetune.ollama.check import check_modelfile

    assert check_modelfile(run_dir / "ollama" / "Modelfile", run_dir / "fused").ok

    # the eval report compares the three models on held-out examples
    report = read_json(run_dir / "eval" / "report.json")
    assert [m["name"] for m in report["models"]] == ["base", "tuned", "q4_k_m"]
    assert report["n_examples"]["task"] == 6 and (run_dir / "eval" / "report.md").is_file()

    # the registry holds exactly one entry, self-contained (Modelfile points at its own GGUF)
    (entry,) = registry.list_entries()
    assert entry.ref == "support-triage:v1"
    assert check_modelfile(entry.path / "Modelfile", run_dir / "fused").ok
    for rel, art in entry.manifest["artifacts"].items():
        p = entry.path / rel
        assert p.exists(), rel
        if p.is_file():
            assert p.stat().st_size == art["size"]

    # running it again does nothing and registers nothing new
    r2 = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r2.exit_code == 0, r2.output
    assert f"already done: {', '.join(pipeline.STAGES)}" in " ".join(r2.output.split()), r2.output  # align (off) included
    assert len(registry.list_entries()) == 1
