"""Each stage of `edgetune run` gives what its standalone command gives on the same inputs.

One tiny run goes through every stage (`edgetune run`) (with an importance matrix in the recipe); then each
stage's CLI command is pointed at the run folder (or at the same inputs) and its outputs are
compared with the pipeline's. A recipe field the pipeline ignored (``export.imatrix`` was) or a
flag the pipeline forgot (``data.chat_template`` for training was) shows up here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from safetensors.numpy import load_file

from edgetune import pipeline, registry
from edgetune.cli import cli
from edgetune.io import read_json
from edgetune.quant.quantize import quantize
from edgetune.runfolder import RunFolder

TIMING = ("tokens_per_s", "ttft_s", "_s", "seconds")  # wall-clock metrics differ between two runs


def _cli(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def done_run(tiny_llama_dir, tmp_path_factory, legacy_imatrix):
    tmp = tmp_path_factory.mktemp("stages")
    from edgetune.export.gguf import convert

    f16 = convert(tiny_llama_dir, tmp / "base-f16.gguf", "f16", verify=False, show_progress=False)
    imatrix, _ = legacy_imatrix(f16, tmp / "imatrix.dat", 0.1, 4.0)
    lines = pipeline.demo_data_path().read_text(encoding="utf-8").splitlines(keepends=True)[:60]
    (tmp / "tickets.jsonl").write_text("".join(lines), encoding="utf-8")
    raw = {
        "name": "tiny",
        "model": str(tiny_llama_dir),
        "output": str(tmp / "runs"),
        "data": {"path": str(tmp / "tickets.jsonl"), "max_seq_len": 256},
        "train": {"backend": "torch", "iters": 2, "batch_size": 2, "max_seq_len": 256, "rank": 4, "alpha": 8,
                  "eval_every": 0, "save_every": 2, "num_threads": 1},
        # verification (llama.cpp vs HF logits, quant drift) is export_model's and tested with it; off here for time
        "export": {"quants": ["q4_k_m", "iq4_nl"], "imatrix": str(imatrix), "verify": False},
        "ollama": {"name": "tiny-triage"},
        "eval": {"limit": 2, "max_tokens": 4, "regression": False},
    }
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:  # module scope runs before the per-test home is set: use our own
        mp.setenv("EDGETUNE_HOME", str(tmp / "home"))
        r = _cli("run", tmp / "tiny.yaml")
    run = RunFolder(tmp / "runs" / "tiny")
    assert all(st["status"] == "done" for st in run.manifest()["stages"].values())
    assert list(run.manifest()["stages"]) == list(pipeline.STAGES)
    assert "ollama create tiny-triage -f" in r.output and "registry: tiny-triage:v1" in r.output
    return run, tmp


def test_run_folder_layout(done_run):
    run, _ = done_run
    assert run.cfg.name == "tiny" and run.model_name == "tiny-triage" and run.modelfile_quant == "q4_k_m"
    assert run.export_types == ["f16", "q4_k_m", "iq4_nl"] and all(p.is_file() for p in run.ggufs)
    for p in (run.data_card, run.split("test"), run.adapter_dir / "adapter_config.json", run.fused_dir / "config.json",
              run.modelfile, run.eval_report("json")):
        assert p.is_file(), p
    assert set(run.eval_specs()) == {"base", "tuned", "q4_k_m"}
    assert set(run.eval_metrics()) == {"base", "tuned", "q4_k_m"}


def test_data_stage_equals_data_prepare(done_run, tmp_path):
    run, tmp = done_run
    _cli("data", "prepare", tmp / "tickets.jsonl", "-o", tmp_path, "--config", run.run_yaml)
    for s in ("train", "valid", "test"):
        assert (tmp_path / f"{s}.jsonl").read_bytes() == run.split(s).read_bytes(), s
    ours, theirs = read_json(tmp_path / "data_card.json"), read_json(run.data_card)
    assert ours["counts"] == theirs["counts"] and ours["splits"] == theirs["splits"] and ours["tokens"] == theirs["tokens"]


def test_train_stage_equals_train_command(done_run, tmp_path):
    run, _ = done_run
    _cli("train", "-d", run.data_dir, "-o", tmp_path, "--config", run.run_yaml)  # the model comes from the recipe
    a = load_file(str(run.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # same seed, same data, one thread: the same adapter
        np.testing.assert_allclose(a[k].astype(np.float32), b[k].astype(np.float32), rtol=0, atol=1e-6, err_msg=k)
    assert any(np.abs(v).max() > 0 for k, v in a.items() if "lora_B" in k)  # it trained (B starts at zero)


def test_fuse_stage_equals_fuse_command(done_run, tmp_path):
    run, _ = done_run
    _cli("fuse", "--base", run.base_model_dir, "--adapter", run.adapter_dir, "-o", tmp_path / "fused")
    assert (tmp_path / "fused" / "model.safetensors").read_bytes() == (run.fused_dir / "model.safetensors").read_bytes()


def test_export_stage_equals_export_command_and_uses_the_imatrix(done_run, tmp_path):
    run, _ = done_run
    # a run folder: its fused model, export settings (imatrix included) and names; the stage verified already
    _cli("export", run.root, "-o", tmp_path, "--no-verify")
    for t in run.export_types:
        assert (tmp_path / run.gguf(t).name).read_bytes() == run.gguf(t).read_bytes(), t
    # export.imatrix reached the quantizer: without it the same quant type rounds differently
    plain = quantize(run.gguf("f16"), tmp_path / "plain-iq4_nl.gguf", "iq4_nl")
    assert plain.read_bytes() != run.gguf("iq4_nl").read_bytes()
    summary = run.manifest()["stages"]["export"]["summary"]
    assert set(summary["gguf"]) == {"f16", "q4_k_m", "iq4_nl"} and "drift" not in summary  # export.verify: false was honoured


def test_eval_stage_equals_eval_command(done_run, tmp_path):
    run, _ = done_run
    _cli("eval", run.root, "-o", tmp_path)
    ours = {m["name"]: m["metrics"] for m in read_json(tmp_path / "report.json")["models"]}
    theirs = {m["name"]: m["metrics"] for m in read_json(run.eval_report("json"))["models"]}
    assert ours.keys() == theirs.keys() == {"base", "tuned", "q4_k_m"}
    for name in ours:  # greedy decoding: the same answers and scores; timings differ
        a = {k: v for k, v in ours[name].items() if not k.endswith(TIMING)}
        b = {k: v for k, v in theirs[name].items() if not k.endswith(TIMING)}
        assert a == b, name


def test_register_stage_equals_models_register_and_registers_once(done_run, monkeypatch):
    run, tmp = done_run
    stage = run.manifest()["stages"]["register"]["summary"]
    monkeypatch.setenv("EDGETUNE_HOME", str(Path(stage["path"]).parents[1]))  # the home the stage registered into
    (entry,) = registry.list_entries()
    assert entry.ref == "tiny-triage:v1" and entry.manifest["metrics"] == run.eval_metrics()
    assert entry.manifest["base_model"]["fingerprint"] == run.manifest()["model_fingerprint"]
    assert entry.manifest["artifacts"]["tiny-triage-q4_k_m.gguf"]["sha256"]
    assert entry.manifest["export"]["imatrix"] == run.cfg.export.imatrix
    assert (entry.path / "Modelfile").read_text().count("FROM ./tiny-triage-q4_k_m.gguf") == 1
    r = _cli("models", "register", run.root)
    assert f"already registered as {entry.ref}" in r.output  # the same fingerprint: the CLI found the stage's entry
    # forcing the stage again finds the same artifacts; a run folder is itself a recipe and continuing it skips everything
    assert pipeline.run(pipeline.load_recipe(tmp / "tiny.yaml"), from_stage="register").stage("register")["created"] is False
    assert pipeline.run(pipeline.load_recipe(run.root)).ran == [] and len(registry.list_entries()) == 1
    # removing the entry and re-running registers a new, higher version (numbers are never reused)
    registry.remove("tiny-triage:v1")
    r4 = pipeline.run(pipeline.load_recipe(tmp / "tiny.yaml"))
    assert r4.ran == ["register"] and r4.stage("register")["ref"] == "tiny-triage:v2"


def test_ollama_stage_equals_ollama_command(done_run, tmp_path):
    run, _ = done_run
    _cli("ollama", run.root, "-o", tmp_path)
    from edgetune.ollama.modelfile_syntax import read_modelfile

    ours, theirs = read_modelfile(tmp_path / "Modelfile"), read_modelfile(run.modelfile)
    strip = [(c.name, c.args) for c in theirs.commands if c.name != "model"]
    assert [(c.name, c.args) for c in ours.commands if c.name != "model"] == strip
    _cli("ollama", "check", run.root)
    (f1,) = [c.args for c in ours.commands if c.name == "model"]
    (f2,) = [c.args for c in theirs.commands if c.name == "model"]
    assert (tmp_path / f1).resolve() == (run.ollama_dir / f2).resolve() == run.gguf(run.modelfile_quant).resolve()


def test_standalone_commands_name_the_missing_stage(tmp_path, tiny_llama_dir):
    run_dir = tmp_path / "runs" / "half"
    run_dir.mkdir(parents=True)
    (run_dir / "run.yaml").write_text(yaml.safe_dump({"name": "half", "model": str(tiny_llama_dir)}), encoding="utf-8")
    r = CliRunner().invoke(cli, ["export", str(run_dir)])
    assert r.exit_code != 0 and "'fuse' stage has not run" in str(r.exception) and "--to fuse" in str(r.exception)
    r = CliRunner().invoke(cli, ["eval", "--run", str(tmp_path)])
    assert r.exit_code != 0 and "is not a run folder" in str(r.exception)


def test_run_summary_suggests_a_prompt_from_the_users_own_data(tiny_llama_dir, tmp_path):
    """Not the demo's support ticket: a unit-conversion run suggests one of its own held-out prompts."""
    rows = []
    for i in range(60):
        km = 3 + i
        rows.append({"messages": [{"role": "user", "content": f"Convert {km} km to miles."},
                                  {"role": "assistant", "content": f"{km * 0.621371:.2f} miles"}]})
    (tmp_path / "units.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    raw = {"name": "units", "model": str(tiny_llama_dir), "output": str(tmp_path / "runs"),
           "data": {"path": str(tmp_path / "units.jsonl"), "max_seq_len": 128},
           "train": {"backend": "torch", "iters": 1, "batch_size": 2, "max_seq_len": 128, "rank": 4, "num_threads": 1, "eval_every": 0},
           "export": {"quants": [], "verify": False}}
    (tmp_path / "units.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    r = _cli("run", tmp_path / "units.yaml", "--to", "ollama")
    run = RunFolder(tmp_path / "runs" / "units")
    prompt = run.sample_prompt()
    test_prompts = [json.loads(x)["messages"][0]["content"] for x in run.split("test").read_text().splitlines()]
    assert prompt == test_prompts[0] and prompt.startswith("Convert ")
    assert f"ollama run units '{prompt}'" in r.output and "PayWell" not in r.output


def test_eval_on_a_run_with_own_models_compares_against_the_first(done_run, tmp_path):
    run, _ = done_run
    _cli("eval", run.root, "-m", f"tuned=hf:{run.fused_dir}", "-m", f"q=gguf:{run.gguf('q4_k_m')}", "-o", tmp_path)
    report = read_json(tmp_path / "report.json")
    assert [m["name"] for m in report["models"]] == ["tuned", "q"] and report["baseline"] == "tuned"


def test_a_run_that_failed_its_gates_is_not_registered(done_run, tmp_path):
    import shutil

    run, _ = done_run
    copy = RunFolder(shutil.copytree(run.root, tmp_path / "tiny"))
    m = copy.manifest()
    m["stages"]["eval"]["summary"]["gates_passed"] = False
    copy.manifest_path.write_text(json.dumps(m), encoding="utf-8")
    r = CliRunner().invoke(cli, ["models", "register", str(copy.root)])
    assert r.exit_code != 0 and "failed its eval gates" in str(r.exception)
    assert registry.list_entries() == []


# --- SFT then DPO: the shipped cpu-sft-dpo-small recipe, shrunk to a tiny model -----------------


@pytest.fixture(scope="module")
def aligned_run(tiny_llama_dir, tmp_path_factory):
    """The shipped SFT→DPO recipe's stages end to end (through GGUF export, the Modelfile and eval),
    with the tiny model, a slice of the demo data and pairs, and a few steps of each stage."""
    from edgetune.recipes import DEMO_PAIRS

    tmp = tmp_path_factory.mktemp("aligned")
    lines = pipeline.demo_data_path().read_text(encoding="utf-8").splitlines(keepends=True)[:60]
    (tmp / "tickets.jsonl").write_text("".join(lines), encoding="utf-8")
    pairs = pipeline.resolve_data(DEMO_PAIRS).read_text(encoding="utf-8").splitlines(keepends=True)[:40]
    (tmp / "pairs.jsonl").write_text("".join(pairs), encoding="utf-8")
    tiny = {"backend": "torch", "iters": 2, "batch_size": 2, "max_seq_len": 256, "rank": 4, "alpha": 8, "eval_every": 0,
            "save_every": 2, "num_threads": 1, "precision": "fp32"}
    sets = [f"model={tiny_llama_dir}", f"output={tmp / 'runs'}", f"data.path={tmp / 'tickets.jsonl'}",
            f"align.data={tmp / 'pairs.jsonl'}", "export.verify=false", "eval.limit=2", "eval.max_tokens=4",
            "align.learning_rate=0.01", "data.replay=0", "eval.regression=false", "eval.max_regression={}"]  # a visible step on random weights
    sets += [f"{sec}.{k}={v}" for sec in ("train", "align") for k, v in tiny.items()]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGETUNE_HOME", str(tmp / "home"))
        r = _cli("run", "cpu-sft-dpo-small", *[a for s in sets for a in ("--set", s)])
    run = RunFolder(tmp / "runs" / "cpu-sft-dpo-small")
    return run, tmp, sets, r.output


def test_sft_then_dpo_recipe_runs_end_to_end(aligned_run):
    run, tmp, sets, output = aligned_run
    stages = run.manifest()["stages"]
    assert list(stages) == list(pipeline.STAGES) and all(st["status"] == "done" for st in stages.values())
    assert run.aligned and run.final_adapter_dir == run.align_adapter_dir
    align = stages["align"]["summary"]
    assert align["objective"] == "dpo" and align["test_prompts_in_sft_train"] == 0 and align["steps"] == 2
    # the DPO adapter was trained on the SFT-merged model, and fuse merged it into that model
    fuse_info = read_json(run.fused_dir / "edgetune_fuse.json")
    assert Path(fuse_info["base"]) == run.sft_model_dir and Path(fuse_info["adapter"]) == run.align_adapter_dir
    assert read_json(run.sft_model_dir / "edgetune_fuse.json")["adapter"] == str(run.adapter_dir)
    # DPO changed the SFT model (same tensors and layout, other values)
    fused, sft = (p / "model.safetensors" for p in (run.fused_dir, run.sft_model_dir))
    assert fused.stat().st_size == sft.stat().st_size and fused.read_bytes() != sft.read_bytes()
    rows = [json.loads(x) for x in (run.align_train_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and "reward_accuracy" in rows[0]
    # export + Modelfile of the final model; eval compares base, sft and tuned, with preference accuracy
    assert all(p.is_file() for p in run.ggufs) and run.modelfile.is_file()
    assert "ollama create support-triage-dpo -f" in output
    report = read_json(run.eval_report("json"))
    assert [m["name"] for m in report["models"]] == ["base", "sft", "tuned", "q4_k_m"]
    n_test = len(run.preference_data.read_text().splitlines())
    assert report["preference"]["n_pairs"] == min(n_test, 2) and report["preference"]["no_logits"] == []
    for m in report["models"]:
        assert 0.0 <= m["metrics"]["preference.accuracy"] <= 1.0 and "preference.margin" in m["metrics"]
    assert "preference.accuracy" in run.eval_report("md").read_text()
    # the registry entry holds both adapters: SFT (on the base) and the DPO one the GGUFs were fused from
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGETUNE_HOME", str(tmp / "home"))
        (entry,) = registry.list_entries()
    assert {"adapter", "align_adapter"} <= entry.manifest["artifacts"].keys() and entry.manifest["align"]["objective"] == "dpo"
    assert (entry.path / "align_adapter" / "adapter_config.json").is_file()


def test_align_reruns_alone_when_its_settings_change(aligned_run):
    run, tmp, sets, _ = aligned_run
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGETUNE_HOME", str(tmp / "home"))
        cfg = pipeline.load_recipe(run.root)
        assert pipeline.run(cfg, to_stage="eval").ran == []  # done: every stage skipped
        changed = pipeline.run(pipeline.load_recipe(run.root, ["align.beta=0.5"]), to_stage="fuse")
    assert changed.skipped == ["data", "train"] and changed.ran == ["align", "fuse"]


def test_align_stage_equals_train_command_and_fuse(aligned_run, tmp_path):
    run, _, _, _ = aligned_run
    # rebuild the stage's adapter by hand: `edgetune train --section align` on the SFT-merged model and the pairs
    _cli("train", "-m", run.sft_model_dir, "-d", run.align_data_dir, "-o", tmp_path / "t", "--config", run.run_yaml,
         "--section", "align")
    a = load_file(str(run.align_adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "t" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(np.abs(v).max() > 0 for k, v in a.items() if "lora_B" in k)
    for k in a:
        np.testing.assert_allclose(a[k].astype(np.float32), b[k].astype(np.float32), rtol=0, atol=1e-6, err_msg=k)
    _cli("fuse", "--base", run.sft_model_dir, "--adapter", run.align_adapter_dir, "-o", tmp_path / "fused")
    assert (tmp_path / "fused" / "model.safetensors").read_bytes() == (run.fused_dir / "model.safetensors").read_bytes()


def test_eval_rows_move_to_a_gguf_when_the_hf_runner_does_not_fit(done_run, tmp_path, monkeypatch):
    """Less memory than the hf runner needs: base and tuned are evaluated on llama.cpp over f16
    GGUFs (the base converted under RUN/eval/), and the report says so and why."""
    from edgetune import hardware

    run, _ = done_run
    monkeypatch.setattr(hardware, "memory_gb", lambda: (1.0, 0.2))  # 0.2 GB free: the runtime alone is 0.3
    _cli("eval", run.root, "-o", tmp_path, "--limit", "1")
    report = read_json(tmp_path / "report.json")
    specs = {m["name"]: m["spec"] for m in report["models"]}
    assert specs["base"] == f"base=gguf:{run.eval_dir / 'base-f16.gguf'}"
    assert specs["tuned"] == f"tuned=gguf:{run.gguf('f16')}"
    assert report["runner_choice"]["runner"] == "gguf" and report["runner_choice"]["gguf_type"] == "f16"
    assert "would need" in report["runner_choice"]["reason"]
    assert "Runner for the run's models: **gguf** (f16 GGUF)" in (tmp_path / "report.md").read_text()


def test_eval_runner_choice_follows_the_switches(tiny_llama_dir):
    from edgetune.config import RunConfig
    from edgetune.eval.fit import choose

    cfg = RunConfig(model=str(tiny_llama_dir))
    assert choose(cfg, tiny_llama_dir, available_bytes=100e9).kind == "hf"
    small = choose(cfg, tiny_llama_dir, available_bytes=0.2e9)
    assert (small.kind, small.gguf_type) == ("gguf", "f16")
    cfg.eval.runner = "hf"
    assert choose(cfg, tiny_llama_dir, available_bytes=0.2e9).kind == "hf"  # forced: the user's call
    cfg.eval.runner = "gguf"
    assert choose(cfg, tiny_llama_dir, available_bytes=100e9).kind == "gguf"
    cfg.eval.runner, cfg.eval.dtype = "auto", "float32"
    assert choose(cfg, tiny_llama_dir, available_bytes=0.2e9).kind == "hf"  # an explicit dtype means hf
    tiny_f16 = 2 * 3.3e6  # the tiny model's f16 file: with less than that usable, q8_0
    assert choose(RunConfig(model=str(tiny_llama_dir)), tiny_llama_dir, available_bytes=tiny_f16).gguf_type == "q8_0"
