"""Benchmark `edgetune data prepare` with near-dedup on N short chat records.

    python scripts/bench_data.py                      # 100k records, no tokenizer
    python scripts/bench_data.py --model models/base/smollm2-135m-instruct   # + token stats

Generates the records (about 5% exact and 5% near duplicates), then runs ``prepare`` in a fresh
child process and reports its wall time and peak RSS (so the generator's memory is not counted).
Target on the 2-core dev machine: < 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("order refund shipping delay account password reset invoice printer battery screen broken update "
         "install warranty manual charger cable network slow crash login email billing plan upgrade cancel "
         "address payment card error code restart settings backup sync device app version support").split()


def generate(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            r = rng.random()
            if rows and r < 0.05:  # exact duplicate
                row = rows[rng.randrange(len(rows))]
            elif rows and r < 0.10:  # near duplicate: one extra word at the end of the answer
                base = rows[rng.randrange(len(rows))]
                row = json.loads(json.dumps(base))
                row["messages"][-1]["content"] += " " + rng.choice(WORDS)
            else:
                q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))) + "?"
                a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 40))) + f" (case {i})."
                row = {"messages": [
                    {"role": "system", "content": "You are a helpful support assistant."},
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": a},
                ]}
                if len(rows) < 20000:
                    rows.append(row)
            f.write(json.dumps(row) + "\n")


CHILD = """
import json, sys, time
from edgetune.config import DataConfig
from edgetune.data import prepare
t = time.perf_counter()
card = prepare(sys.argv[1], sys.argv[2], DataConfig(dedup="near"), model_dir=sys.argv[3] or None)
print(json.dumps({"seconds": time.perf_counter() - t, "counts": card["counts"], "dedup": card["dedup"],
                  "splits": card["splits"], "leakage": card["leakage"]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--model", default="", help="model folder for token stats (optional)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(prefix="bench_data."))
    src = tmp / "in.jsonl"
    t = time.perf_counter()
    generate(src, args.n)
    print(f"generated {args.n:,} records ({src.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp / "out"), args.model],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(proc.stderr)
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_mb = ru.ru_maxrss / 1024  # KiB on Linux
    cpu = ru.ru_utime + ru.ru_stime  # CPU time is the figure that does not depend on other users
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps({
        "records": args.n, "model": args.model or None, "prepare_seconds": round(res["seconds"], 2),
        "process_wall_seconds": round(wall, 2), "process_cpu_seconds": round(cpu, 2), "peak_rss_mb": round(peak_mb, 1), "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2), **{k: res[k] for k in ("counts", "dedup", "splits", "leakage")},
    }, indent=1))
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
