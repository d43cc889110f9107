"""Benchmark: the hf eval runner's generation speed by dtype and batch size, and what the policy picks.

    python scripts/bench_hf_eval.py                      # demo model, 32 held-out demo prompts
    python scripts/bench_hf_eval.py --dtypes float32 --batches 1,8,32 --n 32 --max-tokens 40

For each (dtype, batch) the runner generates greedy answers for the same prompts; reported are
generated tokens per second over the whole set (all rows of a batch share its time) and the seconds
per prompt. The last line is what ``edgetune.precision`` chose for generation on this machine, so
the choice can be checked against the measurements. Prints the CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "edgetune" / "resources" / "demo" / "support_tickets.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "base" / "smollm2-135m-instruct"))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--n", type=int, default=32, help="prompts (the last N demo examples)")
    ap.add_argument("--max-tokens", type=int, default=40)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from edgetune.eval.runners import GenParams, make_runner
    from edgetune.precision import decide

    rows = [json.loads(x) for x in DEMO_DATA.read_text().splitlines()][-a.n :]
    convs = [r["messages"][:2] for r in rows]
    params = GenParams(max_tokens=a.max_tokens)
    from edgetune.hardware import cpu_model_and_flags

    cpu = cpu_model_and_flags()[0]
    print(f"CPU {cpu}; {len(convs)} prompts, max {a.max_tokens} new tokens")
    print(f"{'dtype':9s} {'batch':>5s} {'tokens':>6s} {'seconds':>8s} {'tok/s':>7s} {'s/prompt':>9s}")
    for dtype in a.dtypes.split(","):
        runner = make_runner(f"hf:{a.model}", dtype=dtype)
        runner.generate_batch(convs[:2], GenParams(max_tokens=4))  # warm-up
        for b in (int(x) for x in a.batches.split(",")):
            t0, n = time.perf_counter(), 0
            for i in range(0, len(convs), b):
                n += sum(g.completion_tokens for g in runner.generate_batch(convs[i : i + b], params))
            dt = time.perf_counter() - t0
            print(f"{dtype:9s} {b:5d} {n:6d} {dt:8.1f} {n / dt:7.1f} {dt / len(convs):9.2f}", flush=True)
        runner.close()
    d = decide("generate")
    print(f"policy: generate in {d.dtype} at batch {d.batch_size} ({d.reason})")


if __name__ == "__main__":
    main()
