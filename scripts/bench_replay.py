"""Forgetting with and without replay: the demo task on a deliberately hot schedule, run twice.

    python scripts/bench_replay.py                          # 300 steps at lr 5e-4, replay 0 vs 0.15
    python scripts/bench_replay.py --iters 300 --lr 5e-4 --replay 0.15 --out docs/bench_replay.json

Each arm is `edgetune run quickstart` with the same overrides (steps, learning rate, the regression
set on, the test split's first --limit rows) except `data.replay`; it stops after eval (nothing is
registered). The table: the task metric (json_fields) and the regression pass rate of base, tuned and
q4_k_m in each arm, the tuned model's drop vs base, and per regression category. The goal the issue
sets: with replay the regression drop is at most 2 points while the task metric stays within 1 point
of the run without replay.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_arm(name: str, out: Path, args, replay: float) -> dict:
    sets = [f"name={name}", f"output={out}", f"train.iters={args.iters}", f"train.learning_rate={args.lr}",
            f"data.replay={replay}", "eval.regression=true", f"eval.limit={args.limit}", "eval.nll=false"]
    cmd = [str(ROOT / ".venv" / "bin" / "edgetune"), "run", "quickstart", "--to", "eval"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # 1: a gate failed (the report is written)
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{name} failed ({proc.returncode})")
    report = json.loads((out / name / "eval" / "report.json").read_text())
    card = json.loads((out / name / "data" / "data_card.json").read_text())
    models = {m["name"]: m for m in report["models"]}
    row = {"arm": name, "replay": replay, "seconds": round(time.time() - t0, 1), "mix": card.get("mix"),
           "n_task": report["n_examples"].get("task"), "n_regression": report["n_examples"].get("regression")}
    for m, d in models.items():
        met = d["metrics"]
        row[m] = {"json_fields": met.get("json_fields"), "json_valid": met.get("json_valid"),
                  "regression": met.get("regression.pass_rate"),
                  "per_category": {k.split(".")[-1]: v for k, v in met.items() if k.startswith("regression.per_category.")}}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--replay", type=float, default=0.15)
    ap.add_argument("--limit", type=int, default=60, help="task test rows evaluated")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_replay"))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_replay.json")
    args = ap.parse_args()
    arms = [run_arm("hot-no-replay", args.work, args, 0.0), run_arm("hot-replay", args.work, args, args.replay)]
    load = os.getloadavg()
    result = {"cpu": cpu_name(), "cores": os.cpu_count(), "loadavg_after": [round(x, 2) for x in load],
              "command": "python scripts/bench_replay.py " + " ".join(sys.argv[1:]), "iters": args.iters, "lr": args.lr,
              "arms": arms}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| arm | base regression | tuned regression | drop (pts) | q4_k_m regression | tuned json_fields | q4_k_m json_fields |")
    print("|---|---|---|---|---|---|---|")
    for a in arms:
        b, t, q = a["base"], a["tuned"], a.get("q4_k_m", {})
        print(f"| {a['arm']} (replay {a['replay']}) | {100 * b['regression']:.1f}% | {100 * t['regression']:.1f}% | "
              f"{100 * (b['regression'] - t['regression']):+.1f} | {100 * (q.get('regression') or 0):.1f}% | "
              f"{100 * t['json_fields']:.1f}% | {100 * (q.get('json_fields') or 0):.1f}% |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
