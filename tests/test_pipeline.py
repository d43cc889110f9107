"""Pipeline skip / re-run / resume logic on a tiny random model (data + train stages; seconds)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgetune import pipeline
from edgetune.errors import EdgetuneError
from edgetune.io import read_json


def _status(run_dir: Path) -> dict[str, str]:
    return {k: v["status"] for k, v in read_json(run_dir / "manifest.json")["stages"].items()}


def test_run_skips_done_stages_and_reruns_on_change(tmp_path, tiny_llama_dir, tiny_recipe):
    recipe = tiny_recipe(tmp_path, tiny_llama_dir)
    cfg = pipeline.load_recipe(recipe)
    r1 = pipeline.run(cfg, to_stage="train")
    run_dir = r1.run_dir
    assert r1.ran == ["data", "train"] and r1.skipped == []
    assert (run_dir / "run.yaml").is_file() and pipeline.load_run_config(run_dir).train.iters == 4
    assert (run_dir / "train" / "adapter" / "adapter_config.json").is_file()
    for split in ("train", "valid", "test"):
        assert (run_dir / "data" / f"{split}.jsonl").is_file()
    assert _status(run_dir) == {"data": "done", "train": "done"}
    m = read_json(run_dir / "manifest.json")
    assert m["stages"]["train"]["summary"]["steps"] == 4 and m["stages"]["data"]["output_hash"]

    # unchanged: everything is skipped, nothing rewritten
    adapter_mtime = (run_dir / "train" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    r2 = pipeline.run(pipeline.load_recipe(recipe), to_stage="train")
    assert r2.ran == [] and r2.skipped == ["data", "train"]
    assert (run_dir / "train" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == adapter_mtime

    # a training setting changed: data is skipped, train runs again
    r3 = pipeline.run(pipeline.load_recipe(recipe, ["train.iters=6"]), to_stage="train")
    assert r3.skipped == ["data"] and r3.ran == ["train"]
    assert r3.stage("train")["steps"] == 6 and r3.stage("train")["resumed"] is False
    assert pipeline.load_run_config(run_dir).train.iters == 6  # run.yaml holds the effective settings

    # --from forces a stage and the ones after it
    r4 = pipeline.run(pipeline.load_recipe(recipe, ["train.iters=6"]), from_stage="data", to_stage="train")
    assert r4.ran == ["data", "train"]

    # a data setting changed: both run (train's inputs include data's output hash)
    r5 = pipeline.run(pipeline.load_recipe(recipe, ["train.iters=6", "data.test_ratio=0.2"]), to_stage="train")
    assert r5.ran == ["data", "train"]


def test_missing_outputs_are_rebuilt(tmp_path, tiny_llama_dir, tiny_recipe):
    recipe = tiny_recipe(tmp_path, tiny_llama_dir)
    r1 = pipeline.run(pipeline.load_recipe(recipe), to_stage="train")
    import shutil

    shutil.rmtree(r1.run_dir / "train" / "adapter")
    r2 = pipeline.run(pipeline.load_recipe(recipe), to_stage="train")
    assert r2.skipped == ["data"] and r2.ran == ["train"]
    assert (r1.run_dir / "train" / "adapter" / "adapter_model.safetensors").is_file()


def test_failed_stage_is_recorded_and_clear(tmp_path, tiny_llama_dir, tiny_recipe):
    recipe = tiny_recipe(tmp_path, tiny_llama_dir)
    with pytest.raises(EdgetuneError, match="Unknown stage"):
        pipeline.run(pipeline.load_recipe(recipe), to_stage="nope")
    with pytest.raises(EdgetuneError, match="Training data not found"):
        pipeline.run(pipeline.load_recipe(recipe, [f"data.path={tmp_path / 'missing.jsonl'}"]))
    with pytest.raises(EdgetuneError, match="export.quants = 'q4_k_mm' is not one of"):
        pipeline.run(pipeline.load_recipe(recipe, ["export.quants=q4_k_mm"]))
    with pytest.raises(EdgetuneError, match="ollama.quant = q8_0 is not exported"):
        pipeline.run(pipeline.load_recipe(recipe, ["ollama.quant=q8_0"]))
    assert not (tmp_path / "runs").exists(), "bad settings must fail before anything is written"
    with pytest.raises(EdgetuneError, match="Base model folder not found"):
        pipeline.run(pipeline.load_recipe(recipe, [f"model={tmp_path / 'no-model'}"]))
    # a stage that fails leaves status 'failed' with the message, and earlier stages done
    with pytest.raises(EdgetuneError):
        pipeline.run(pipeline.load_recipe(recipe, ["train.target_modules=no_such_module"]), to_stage="train")
    run_dir = tmp_path / "runs" / "tiny"
    st = read_json(run_dir / "manifest.json")["stages"]
    assert st["data"]["status"] == "done" and st["train"]["status"] == "failed" and st["train"]["error"]
    assert not (run_dir / ".lock").exists()


def test_killed_training_resumes_without_redoing_data(tmp_path, tiny_llama_dir, tiny_recipe):
    """SIGKILL `edgetune run` mid-training; the same command then resumes from the checkpoint."""
    recipe = tiny_recipe(tmp_path, tiny_llama_dir, iters=60, save_every=3)
    run_dir = tmp_path / "runs" / "tiny"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "from edgetune.cli import main; main()", "run", str(recipe), "--to", "train"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = run_dir / "train" / "checkpoints" / "last"
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            if state.is_dir() and any(state.iterdir()):
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    st = read_json(run_dir / "manifest.json")["stages"]
    assert st["data"]["status"] == "done" and st["train"]["status"] == "running"
    data_mtime = (run_dir / "data" / "train.jsonl").stat().st_mtime_ns

    result = pipeline.run(pipeline.load_recipe(recipe), to_stage="train")
    assert result.skipped == ["data"] and result.ran == ["train"]
    assert result.stage("train")["resumed"] is True and result.stage("train")["steps"] == 60
    assert (run_dir / "data" / "train.jsonl").stat().st_mtime_ns == data_mtime
    metrics = [json.loads(x) for x in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in metrics if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # continued, not restarted or duplicated
