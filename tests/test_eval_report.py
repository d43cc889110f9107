"""evaluate() end to end: several real models side by side, reports, drift, gates, judge, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetune.config import EvalConfig
from edgetune.errors import EdgetuneError
from edgetune.eval import evaluate
from edgetune.eval.data import load_examples, load_regression, run_check
from edgetune.eval.judge import judge_models
from edgetune.eval.runners import Generation, Runner

DEMO = Path(__file__).resolve().parents[1] / "edgetune" / "resources" / "demo" / "support_tickets.jsonl"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def task3(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("task") / "test.jsonl"
    p.write_text("".join(DEMO.read_text().splitlines(keepends=True)[:3]))
    return p


@pytest.fixture(scope="module")
def tiny_adapter(tiny_llama_dir, tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama_dir, tmp_path_factory) -> Path:
    from edgetune.export.gguf import convert

    return convert(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", "f32", verify=False,
                   show_progress=False)


def test_base_vs_tuned_vs_gguf_report_with_drift(tiny_llama_dir, tiny_adapter, tiny_gguf, task3, tmp_path):
    cfg = EvalConfig(max_tokens=6, regression=False, drift_reference="base", dtype="float32")
    specs = [f"base=hf:{tiny_llama_dir}", f"tuned=hf:{tiny_llama_dir}+adapter:{tiny_adapter}", f"f32=gguf:{tiny_gguf}"]
    report = evaluate(task3, specs, tmp_path / "eval", cfg)
    assert [m["name"] for m in report["models"]] == ["base", "tuned", "f32"]
    assert report["headline"] == "json_fields" and report["baseline"] == "base"
    for m in report["models"]:
        assert {"json_fields", "json_valid", "json_schema", "nll", "perplexity", "latency_s"} <= set(m["metrics"])
        assert {"per_field.category", "per_field.urgency", "per_field.product"} <= set(m["metrics"])
    by = {m["name"]: m["metrics"] for m in report["models"]}
    # the f32 GGUF computes what the HF model computes: same reference NLL; the adapter changes it
    assert by["f32"]["nll"] == pytest.approx(by["base"]["nll"], rel=0.01)
    assert abs(by["tuned"]["nll"] - by["base"]["nll"]) > 0.01
    assert report["deltas"]["tuned"]["nll"] == pytest.approx(by["tuned"]["nll"] - by["base"]["nll"])
    drift = report["drift"]["candidates"]
    assert drift["f32"]["top1_agreement"] >= 0.95 and drift["f32"]["kl"] < 1e-3
    assert drift["tuned"]["kl"] > 10 * drift["f32"]["kl"]
    rows = report["examples"]["task"]
    assert len(rows) == 3 and set(rows[0]["outputs"]) == {"base", "tuned", "f32"}
    on_disk = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert on_disk["models"][1]["metrics"] == pytest.approx(report["models"][1]["metrics"])
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "## Metrics" in md and "| json_fields |" in md and "## Change vs base" in md
    assert "## Drift vs base" in md and "Worst task examples" in md
    html = (tmp_path / "eval" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3  # quality, latency, drift charts
    assert "<table>" in html


def test_cli_gates_exit_1_with_failing_numbers(tiny_llama_dir, task3, tmp_path):
    from edgetune.cli.eval import eval_group

    base = ["--data", str(task3), "-m", f"hf:{tiny_llama_dir}", "--max-tokens", "4", "--no-regression", "--no-nll",
            "-o", str(tmp_path / "r")]
    res = CliRunner().invoke(eval_group, base + ["--min", "json_fields=1.01"])
    assert res.exit_code == 1, res.output
    text = res.output + (res.stderr if hasattr(res, "stderr") else "")
    assert "gate failed" in text and "required >= 1.01" in text and "json_fields = 0" in text
    assert (tmp_path / "r" / "report.md").read_text().count("❌") == 1
    res = CliRunner().invoke(eval_group, base + ["--min", "json_valid=0", "--json", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["gates"]["passed"] is True


def test_cli_drift_subcommand(tiny_llama_dir, tiny_gguf, task3, tmp_path):
    from edgetune.cli.eval import eval_group

    out = tmp_path / "drift.json"
    res = CliRunner().invoke(eval_group, ["drift", "--reference", f"hf:{tiny_llama_dir}", "--candidate", f"q=gguf:{tiny_gguf}",
                                          "--data", str(task3), "--limit", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())["candidates"]["q"]
    assert d["tokens"] > 10 and d["top1_agreement"] >= 0.95 and 0 <= d["kl"] < 1e-3


def test_regression_set_is_well_formed_and_its_references_pass():
    reg = load_regression()
    assert len(reg) >= 100  # tests/test_regression_suite.py checks the set row by row
    assert {e.category for e in reg} == {"instruction", "format", "arithmetic", "factual", "refusal", "benign", "multilingual"}
    assert len({e.id for e in reg}) == len(reg)
    for e in reg:
        assert run_check(e.reference, e.check) == 1.0, e.id  # every check accepts its own reference


def test_regression_set_runs_with_the_task(tiny_gguf, task3, tmp_path):
    cfg = EvalConfig(max_tokens=4, regression_max_tokens=4, nll=False, limit=1)
    report = evaluate(task3, [f"gguf:{tiny_gguf}"], tmp_path, cfg)
    m = report["models"][0]["metrics"]
    assert 0.0 <= m["regression.pass_rate"] <= 1.0
    assert {"regression.per_category.arithmetic", "regression.per_category.refusal"} <= set(m)
    assert len(report["examples"]["regression"]) == len(load_regression())
    assert "## Regression set by category" in (tmp_path / "report.md").read_text()


class _AlwaysA(Runner):
    """A judge with maximal position bias: it always prefers whatever it reads first."""

    kind = "scripted"

    def generate(self, messages, params):
        return Generation("A", 0, 1, 0.0, 0.0)


def test_judge_swaps_order_so_position_bias_cancels(task3):
    exs = load_examples(task3)
    outputs = {"base": [{"output": "x"}] * 3, "tuned": [{"output": e.reference} for e in exs]}
    res = judge_models(_AlwaysA("scripted:A"), exs, outputs, "base")
    assert res["tuned"]["ties"] == 3 and res["tuned"]["win_rate"] == 0.5
    assert res["tuned"]["first_position_rate"] == 1.0


def test_judge_with_a_real_runner(tiny_gguf, task3):
    exs = load_examples(task3)[:2]
    outputs = {"base": [{"output": "no idea"}] * 2, "tuned": [{"output": e.reference} for e in exs]}
    res = judge_models(f"gguf:{tiny_gguf}", exs, outputs, "base")
    assert res["judge"] == f"gguf:{tiny_gguf}"
    t = res["tuned"]
    assert t["wins"] + t["ties"] + t["losses"] == 2 and 0 <= t["win_rate"] <= 1


def test_bad_inputs_are_clear_errors(tiny_llama_dir, task3, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(EdgetuneError) as exc:
        load_examples(bad)
    assert "bad.jsonl:1" in exc.value.where
    with pytest.raises(EdgetuneError, match="both named"):
        evaluate(task3, [f"hf:{tiny_llama_dir}", f"hf:{tiny_llama_dir}"], tmp_path, EvalConfig())
    with pytest.raises(EdgetuneError, match="not found"):
        evaluate(tmp_path / "nope.jsonl", [f"hf:{tiny_llama_dir}"], tmp_path, EvalConfig())
    with pytest.raises(EdgetuneError, match="GGUF file not found"):
        evaluate(task3, ["gguf:/nonexistent.gguf"], tmp_path, EvalConfig(regression=False))


@pytest.mark.slow
def test_demo_tuned_beats_base_on_the_task(demo_model_dir, tmp_path):
    """The issue's acceptance test: LoRA on the demo task, then base vs tuned vs tuned-q4_k_m."""
    from edgetune.config import DataConfig, TrainConfig
    from edgetune.data import prepare
    from edgetune.export.adapter import export_adapter
    from edgetune.train import train

    data = tmp_path / "data"
    prepare(DEMO, data, DataConfig(valid_ratio=0.05, test_ratio=0.05, max_seq_len=256), demo_model_dir)
    tcfg = TrainConfig(rank=8, alpha=16, dropout=0.0, learning_rate=1e-3, iters=40, batch_size=3, max_seq_len=256,
                       eval_every=0, save_every=1000, backend="torch")
    res = train(demo_model_dir, data, tmp_path / "run", tcfg)
    adapter = tmp_path / "run" / "adapter"
    specs = [f"base=hf:{demo_model_dir}", f"tuned=hf:{demo_model_dir}+adapter:{adapter}"]
    try:
        from edgetune.export.gguf import convert
        from edgetune.fuse import fuse
        from edgetune.quant.quantize import quantize

        fused = fuse(demo_model_dir, adapter, tmp_path / "fused")
        f16 = convert(fused, tmp_path / "m-f16.gguf", "f16", verify=False, show_progress=False)
        q4 = quantize(f16, tmp_path / "m-q4_k_m.gguf", "q4_k_m")
        specs.append(f"q4_k_m=gguf:{q4}")
    except ImportError:
        q4 = None
    del res, export_adapter
    cfg = EvalConfig(max_tokens=40, limit=12, regression=False, nll=False)  # dtype + batch: the policy
    report = evaluate(data / "test.jsonl", specs, tmp_path / "eval", cfg)
    by = {m["name"]: m["metrics"] for m in report["models"]}
    assert by["tuned"]["json_fields"] >= by["base"]["json_fields"] + 0.3, by
    if q4 is not None:
        assert by["q4_k_m"]["json_fields"] >= by["base"]["json_fields"] + 0.3, by
    shutil.rmtree(tmp_path / "fused", ignore_errors=True)


def _overlaps(a, b) -> bool:
    return a.width > 0 and b.width > 0 and a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_report_charts_have_no_overlapping_titles():
    """Render every report chart and measure its text boxes: the figure title, the subplot titles and
    the tick labels never overlap one another, and nothing is drawn outside the figure."""
    from edgetune.eval.report import chart_figures

    names = ["base", "tuned-with-a-long-name", "q4_k_m"]
    metrics = {"json_valid": 0.9, "json_fields": 0.8, "exact_match": 0.5, "ttft_s": 0.12, "latency_s": 0.8, "tokens_per_s": 41.0}
    report = {"headline": "json_fields", "models": [{"name": n, "metrics": metrics} for n in names],
              "drift": {"reference": "tuned-with-a-long-name",
                        "candidates": {"q4_k_m": {"kl": 0.02, "top1_agreement": 0.95}, "q8_0": {"kl": 0.001, "top1_agreement": 0.99}}}}
    figs = chart_figures(report)
    assert set(figs) == {"quality", "latency", "drift"}
    for name, fig in figs.items():
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        page = fig.bbox
        titles = [("figure title", fig._suptitle)] if fig._suptitle else []
        titles += [(f"title of subplot {i}", ax.title) for i, ax in enumerate(fig.axes) if ax.get_title()]
        ticks = []
        for i, ax in enumerate(fig.axes):  # the labels drawn: ticks inside the view limits
            for locs, labels, (lo, hi) in ((ax.get_xticks(), ax.get_xticklabels(), sorted(ax.get_xlim())),
                                           (ax.get_yticks(), ax.get_yticklabels(), sorted(ax.get_ylim()))):
                ticks += [(f"tick label {t.get_text()!r} of subplot {i}", t) for v, t in zip(locs, labels, strict=False)
                          if t.get_text() and lo <= v <= hi]
        boxes = [(label, t.get_window_extent(r)) for label, t in titles + ticks]
        for label, box in boxes:
            assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1 and page.y0 - 1 <= box.y0 and box.y1 <= page.y1 + 1, (name, label)
        for i, (la, a) in enumerate(boxes[: len(titles)]):
            for lb, b in boxes[i + 1:]:
                assert not _overlaps(a, b), f"{name}: {la} overlaps {lb}"
        import matplotlib.pyplot as plt

        plt.close(fig)
