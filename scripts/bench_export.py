"""Benchmark: wall time and peak RSS of HF -> f16 GGUF conversion and of q4_k_m quantization.

    python scripts/bench_export.py [MODEL_DIR] [--out DIR] [--verify]

Each step runs in a fresh Python process so its peak RSS (ru_maxrss) is its own. The target for
conversion is peak RSS <= 2 x the largest single tensor + 300 MB (interpreter and libraries):
tensors are streamed one at a time, so the model size must not show up in the peak. The
tokenizer is resolved by transformers in a short-lived child process (transformers imports torch);
its peak is printed separately.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
step, src, dst, verify = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
t_imp = time.perf_counter()
if step == "convert":
    from edgetune.export.gguf import convert
else:
    from edgetune.quant.quantize import quantize
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
if step == "convert":
    convert(src, dst, "f16", verify=verify, show_progress=False)
else:
    quantize(src, dst, "q4_k_m")
wall = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the tokenizer probe, if it ran
print(json.dumps({"step": step, "wall_s": round(wall, 2), "peak_rss_mb": round(peak, 1), "rss_after_imports_mb": round(base_rss, 1), "child_peak_rss_mb": round(kids, 1)}))
"""


def run(step: str, src: Path, dst: Path, verify: bool) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    res = subprocess.run([sys.executable, "-c", CHILD, step, str(src), str(dst), "1" if verify else "0"], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-4000:])
        raise SystemExit(f"{step} failed")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    from edgetune.paths import demo_model_dir
    from edgetune.tensors import SafetensorsReader

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default=None, help="HF model folder (default: the demo model)")
    ap.add_argument("--out", default=None, help="folder for the GGUF files (default: a temp dir)")
    ap.add_argument("--verify", action="store_true", help="include the HF verification in the conversion timing")
    a = ap.parse_args()
    model = Path(a.model_dir) if a.model_dir else demo_model_dir()
    rd = SafetensorsReader(model)
    largest = rd.largest_nbytes() / 2**20
    model_mb = sum(r.nbytes for r in rd.refs.values()) / 2**20
    with tempfile.TemporaryDirectory() as td:
        out = Path(a.out) if a.out else Path(td)
        out.mkdir(parents=True, exist_ok=True)
        f16 = out / "bench-f16.gguf"
        conv = run("convert", model, f16, a.verify)
        quant = run("quantize", f16, out / "bench-q4_k_m.gguf", False)
        sizes = {p.name: round(p.stat().st_size / 2**20, 1) for p in out.glob("bench-*.gguf")}
    target = 2 * largest + 300
    print(f"model: {model} ({model_mb:.0f} MiB of weights, largest tensor {largest:.1f} MiB)")
    print(f"convert -> f16{' (+verify)' if a.verify else ''}: {conv['wall_s']:.1f} s, peak RSS {conv['peak_rss_mb']:.0f} MiB "
          f"(after imports {conv['rss_after_imports_mb']:.0f} MiB); target <= {target:.0f} MiB: {'OK' if conv['peak_rss_mb'] <= target else 'OVER'}")
    print(f"  (separate short-lived tokenizer probe process, transformers+torch: peak RSS {conv['child_peak_rss_mb']:.0f} MiB)")
    print(f"quantize f16 -> q4_k_m: {quant['wall_s']:.1f} s, peak RSS {quant['peak_rss_mb']:.0f} MiB")
    print(f"files: {sizes}")


if __name__ == "__main__":
    main()
