"""Benchmark: does our importance matrix lower quantization drift? KL / top-1 vs f16, with and without.

    python scripts/bench_imatrix.py [--model models/base/smollm2-135m-instruct] [--calib-rows 200]
        [--heldout-rows 64] [--types q4_k_m,q3_k_m,iq3_m] [--out DIR]

The demo support tickets are split by row: the first --calib-rows make the imatrix (rendered
through the chat template, prompts and answers: what `edgetune export imatrix` does with a run's
train split), the last --heldout-rows are the held-out text. Each type is quantized from the same
f16 GGUF with and without the matrix; both are measured against the f16 GGUF by llama.cpp on
(a) the held-out chats and (b) export/verify.py's fixed corpus (code, unicode, numbers: text unlike
the calibration data). Prints a Markdown table and writes it with JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models/base/smollm2-135m-instruct"))
    ap.add_argument("--data", default=None, help="JSONL rows (default: the demo support tickets)")
    ap.add_argument("--calib-rows", type=int, default=200)
    ap.add_argument("--heldout-rows", type=int, default=64)
    ap.add_argument("--types", default="q4_k_m,q3_k_m,iq3_m")
    ap.add_argument("--out", default=None)
    ap.add_argument("--reuse", action="store_true", help="keep the f16 GGUF, imatrix and quantized files already in --out")
    a = ap.parse_args()

    from edgetune import pipeline
    from edgetune.data.template import load_tokenizer
    from edgetune.export.gguf import convert
    from edgetune.export.imatrix import calibration_texts, make_imatrix
    from edgetune.llamacpp import load_llama
    from edgetune.quant.autoquant import heldout_token_lists, measure
    from edgetune.quant.quantize import quantize

    out = Path(a.out or tempfile.mkdtemp(prefix="bench-imatrix-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = Path(a.data or pipeline.demo_data_path()).read_text(encoding="utf-8").splitlines(keepends=True)
    if a.calib_rows + a.heldout_rows > len(rows):
        sys.exit(f"only {len(rows)} rows: lower --calib-rows / --heldout-rows")
    calib, held = out / "calib.jsonl", out / "heldout.jsonl"
    calib.write_text("".join(rows[: a.calib_rows]), encoding="utf-8")
    held.write_text("".join(rows[-a.heldout_rows:]), encoding="utf-8")

    reuse = a.reuse and (out / "imatrix.json").is_file() and (out / "m-f16.gguf").is_file()
    t0 = time.perf_counter()
    f16 = out / "m-f16.gguf" if reuse else convert(a.model, out / "m-f16.gguf", "f16", verify=False, show_progress=False)
    t_conv = time.perf_counter() - t0
    t0 = time.perf_counter()
    rec = json.loads((out / "imatrix.json").read_text()) if reuse else make_imatrix(a.model, calib, out / "imatrix.gguf")
    t_im = time.perf_counter() - t0
    print(f"imatrix: {rec['tokens']} tokens from {rec['texts']} rows in {t_im:.0f}s (f16 convert {t_conv:.0f}s)", flush=True)

    files, used = {}, {}
    for q in a.types.split(","):
        for with_im in (False, True):
            label = f"{q}+imatrix" if with_im else q
            files[label] = out / f"m-{label}.gguf"
            if reuse and files[label].is_file():
                used[label] = with_im
                continue
            files[label] = quantize(f16, out / f"m-{label}.gguf", q, imatrix=out / "imatrix.gguf" if with_im else None,
                                    require_imatrix=False)
            used[label] = with_im
    llm = load_llama(f16, n_ctx=512, logits_all=False)
    try:
        sets = {"held-out chats": heldout_token_lists(llm, calibration_texts(held, load_tokenizer(a.model))),
                "fixed corpus": heldout_token_lists(llm, None)}
    finally:
        llm.close()
    print(f"measuring {len(files)} files on {', '.join(sets)}…", flush=True)
    results = {name: {r.qtype: r for r in measure(f16, files, lists, used)} for name, lists in sets.items()}
    positions = {name: sum(len(x) for x in lists) for name, lists in sets.items()}

    lines = ["| type | imatrix | size MiB | bits/weight | " + " | ".join(f"KL {n} | top-1 {n}" for n in sets) + " |",
             "|---|---|---:|---:|" + "---:|---:|" * len(sets)]
    for q in a.types.split(","):
        for label in (q, f"{q}+imatrix"):
            first = results["held-out chats"][label]
            cells = []
            for n in sets:
                r = results[n][label]
                base = results[n][q].mean_kl
                delta = f" ({(r.mean_kl - base) / base:+.0%})" if label != q and base > 0 else ""
                cells.append(f"{r.mean_kl:.4f}{delta} | {r.top1:.1%}")
            lines.append(f"| {q} | {'yes' if used[label] else 'no'} | {first.size_mb:.1f} | {first.bpw:.2f} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    head = (f"model {a.model}; imatrix from {rec['texts']} rows / {rec['tokens']} tokens (rows 1-{a.calib_rows}); "
            f"held-out: last {a.heldout_rows} rows ({positions['held-out chats']} positions), fixed corpus "
            f"({positions['fixed corpus']} positions); KL = mean KL(f16 || quant), nats")
    print(head + "\n\n" + table)
    (out / "bench_imatrix.md").write_text(head + "\n\n" + table + "\n", encoding="utf-8")
    (out / "bench_imatrix.json").write_text(json.dumps({
        "model": a.model, "imatrix": rec, "positions": positions,
        "results": {n: {k: vars(v) for k, v in rs.items()} for n, rs in results.items()}}, indent=2), encoding="utf-8")
    print(f"\nwrote {out / 'bench_imatrix.md'}")


if __name__ == "__main__":
    main()
