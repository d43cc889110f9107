"""Measure the adapter route against merge-and-requantize, side by side, in one run per source.

For each source GGUF (default: the demo's own Q4_1 file, and a Q4_K_M made from the demo model):

1. ``edgetune models import SOURCE`` -> an HF folder de-quantized from that exact file;
2. ``edgetune run`` of the quickstart recipe on it with ``export.route: adapter`` (SFT 60 steps,
   the adapter exported as a GGUF LoRA and checked on the source, the Modelfile FROM the source +
   ADAPTER, eval);
3. from the same run's fused model: the f16 GGUF and the f16 requantized to the source's type with
   the run's importance matrix (``export.imatrix: auto`` from the train split);
4. one eval of the held-out test split over (a) the source + adapter, (b) merged + requantized,
   (c) merged f16, plus the file sizes.

    python scripts/bench_adapter_route.py                 # both sources
    python scripts/bench_adapter_route.py --sources q4_1  # the demo's Q4_1 only

Prints a table and writes docs/bench_adapter_route.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def sh(*args, **kw):
    print("$", " ".join(map(str, args)), file=sys.stderr, flush=True)
    subprocess.run([str(a) for a in args], check=True, cwd=REPO, **kw)


def source_file(kind: str, work: Path) -> Path:
    from edgetune.demo_model import locate_gguf

    q41 = locate_gguf(download=False)
    if kind == "q4_1":
        return q41
    from edgetune.export.gguf import convert
    from edgetune.paths import demo_model_dir
    from edgetune.quant.quantize import quantize

    f16 = convert(demo_model_dir(), work / "demo-f16.gguf", "f16", verify=False, show_progress=False)
    return quantize(f16, work / f"demo-{kind}.gguf", kind)


def one(kind: str, work: Path, args) -> dict:
    from edgetune.config import EvalConfig
    from edgetune.eval.core import evaluate
    from edgetune.quant.build import export_model
    from edgetune.runfolder import RunFolder

    src = source_file(kind, work)
    imported = work / f"imported-{kind}"
    sh(PY, "-m", "edgetune", "models", "import", src, "-o", imported, "--force")
    name = f"route-{kind}"
    sets = [f"model={imported}", f"name={name}", f"output={work}", "export.route=adapter", f"train.iters={args.iters}",
            f"eval.limit={args.limit}", f"ollama.name={name}"]
    sh(PY, "-m", "edgetune", "run", "quickstart", *[x for s in sets for x in ("--set", s)])
    run = RunFolder(work / name)
    export = json.loads((run.root / "manifest.json").read_text())["stages"]["export"]["summary"]
    merged = export_model(run.fused_dir, work / f"merged-{kind}", [kind], outtype="f16", imatrix="auto",
                          calib=run.split("train"), verify=False, name=name, show_progress=False)
    files = {t: Path(p) for t, p in merged["files"].items()}
    specs = [f"{kind}+adapter=gguf:{src}+adapter:{run.adapter_gguf}", f"merged-{kind}=gguf:{files[kind]}",
             f"merged-f16=gguf:{files['f16']}"]
    cfg = EvalConfig(max_tokens=40, limit=args.limit, regression=False, nll=False)
    rep = evaluate(run.split("test"), specs, work / f"eval-{kind}", cfg, baseline="merged-f16")
    table = {}
    for label in (f"{kind}+adapter", f"merged-{kind}", "merged-f16"):
        row = next(m for m in rep["models"] if m.get("name") == label)
        table[label] = {k: row["metrics"].get(k) for k in ("json_fields", "exact_match", "json_valid")}
    sizes = {f"{kind}+adapter": src.stat().st_size + run.adapter_gguf.stat().st_size,
             f"merged-{kind}": files[kind].stat().st_size, "merged-f16": files["f16"].stat().st_size}
    return {"source": str(src), "source_type": kind, "adapter_bytes": run.adapter_gguf.stat().st_size,
            "source_bytes": src.stat().st_size, "adapter_share": run.adapter_gguf.stat().st_size / src.stat().st_size,
            "verify": export.get("verify"), "imatrix": merged.get("imatrix"), "metrics": table,
            "sizes": sizes, "n_examples": rep.get("n_examples")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", nargs="+", default=["q4_1", "q4_k_m"])
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_route_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["EDGETUNE_HOME"] = str(work / "home")  # the runs' registry entries stay in the work folder
    results = {k: one(k, work, args) for k in args.sources}
    from edgetune.hardware import cpu_model_and_flags

    with os.popen("uptime") as fh:
        load = fh.read().strip()
    print(f"\nCPU {cpu_model_and_flags()[0]}; load: {load}")
    print(f"{'source':8s} {'model':16s} {'json_fields':>11s} {'exact':>7s} {'size MB':>8s}")
    for k, r in results.items():
        for label, m in r["metrics"].items():
            print(f"{k:8s} {label:16s} {m['json_fields']:11.3f} {m['exact_match']:7.3f} {r['sizes'][label] / 2**20:8.1f}")
        v = (r["verify"] or {}).get("source+adapter vs imported+adapter", {})
        print(f"{k:8s} adapter {r['adapter_bytes'] / 2**20:.2f} MB = {r['adapter_share']:.2%} of the source; "
              f"check on the source: top-1 {v.get('top1')}, KL {v.get('mean_kl')}")
    out = REPO / "docs" / "bench_adapter_route.json"
    out.write_text(json.dumps({"cpu": cpu_model_and_flags()[0], "load": load, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
