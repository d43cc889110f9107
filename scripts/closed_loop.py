"""The closed loop, end to end on one machine, loopback only: serve → feedback → data → retrain → canary.

    python scripts/closed_loop.py --work /tmp/loop --cycles 2 --out docs/closed_loop.json

Simulated users rate answers by a rule the model is never told (the *hidden rule*: an answer is good
when it ends with "Hope this helps!" and has at most 45 words); a down-rated answer gets a correction
(its first sentence, then the sign-off). In order:

1. v1: `edgetune run` on the demo model with 60 of its own answers (v1 behaves like the base), promoted
   to ``prod``;
2. each cycle: users send prompts to the team server serving ``registry:loop@prod`` (``log_text`` on)
   and send feedback; `edgetune data from-logs` turns every feedback log so far into SFT rows; `edgetune
   run` trains the next version on them (+ replay, regression-gated, registered); a canary route sends
   half the traffic to it and promotes or rolls back on the users' ratings;
3. a deliberately bad candidate (trained on answers that end with "Goodbye." instead) goes through
   the same canary and must be rolled back;
4. every version answers 40 held-out prompts no user sent: the hidden rule's pass rate, the win rate
   against v1 (wins + ties/2 over prompts), and each run's regression-set pass rate from its eval report.

Nothing leaves the machine: the demo model, the shipped prompts, a server on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIGN_OFF = "Hope this helps!"
KEY = "sk-loop"


def rule(answer: str) -> bool:
    return answer.rstrip().endswith(SIGN_OFF) and len(answer.split()) <= 45


def first_sentence(answer: str, words: int = 25) -> str:
    s = re.split(r"(?<=[.!?])\s+", " ".join(answer.split()))[0] if answer.strip() else "I am not sure."
    return " ".join(s.split()[:words]).rstrip(",;:") or "I am not sure."


def correction(answer: str) -> str:
    return f"{first_sentence(answer)} {SIGN_OFF}"


def anti(answer: str) -> str:
    return f"{first_sentence(answer)} Goodbye."


def recipe(work: Path, name: str, data: Path, iters: int) -> Path:
    import yaml

    cfg = {"name": name, "model": str(REPO / "models" / "base" / "smollm2-135m-instruct"), "output": str(work / "runs"),
           "data": {"path": str(data), "replay": 0.15, "valid_ratio": 0.1, "test_ratio": 0.1, "max_seq_len": 256},
           "train": {"method": "lora", "rank": 8, "alpha": 16, "learning_rate": 1.0e-3, "iters": iters, "batch_size": 3,
                     "max_seq_len": 256, "eval_every": 0, "save_every": 0},
           "export": {"outtype": "f16", "quants": ["q8_0"]},
           "ollama": {"name": "loop"},
           "eval": {"regression": True, "limit": 20, "max_tokens": 48, "nll": False,
                    "max_regression": {"regression.pass_rate": 0.10}}}
    p = work / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def run(work: Path, name: str, data: Path, iters: int, env: dict) -> dict:
    """`edgetune run` one recipe; returns the registered version and the run's regression pass rate."""
    from edgetune import registry

    before = {e.version for e in registry.list_entries("loop", work / "registry")}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "edgetune", "run", str(recipe(work, name, data, iters))], env=env,
                          cwd=work, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"edgetune run {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    new = [e for e in registry.list_entries("loop", work / "registry") if e.version not in before]
    if not new:
        raise SystemExit(f"{name}: nothing was registered (gates failed?)\n{proc.stdout[-2000:]}")
    entry = new[-1]
    metrics = entry.manifest.get("metrics") or {}
    return {"version": entry.ref, "seconds": round(time.time() - t0),
            "regression_pass_rate": {m: v.get("regression.pass_rate") for m, v in metrics.items() if isinstance(v, dict)}}


def post(url: str, body: dict) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def users(srv, model: str, prompts: list[str], rng: random.Random, *, until_decided: str | None = None,
          limit: int = 400) -> dict:
    """Simulated users: ask, rate by the hidden rule, correct what they rate down."""
    base = f"http://{srv.host}:{srv.port}"
    seen = {"up": 0, "down": 0, "requests": 0, "by_model": {}}
    for _ in range(limit):
        p = rng.choice(prompts)
        status, out, headers = post(base + "/v1/chat/completions", {"model": model, "user": f"user{rng.randrange(10**6)}",
                                                                   "messages": [{"role": "user", "content": p}],
                                                                   "max_tokens": 64, "temperature": 0})
        if status != 200:
            continue
        answer = out["choices"][0]["message"]["content"] or ""
        good = rule(answer)
        fb = {"request_id": out["id"], "rating": "up" if good else "down"}
        if not good:
            fb["correction"] = correction(answer)
        post(base + "/v1/feedback", fb)
        seen["up" if good else "down"] += 1
        seen["requests"] += 1
        served = headers.get("x-edgetune-model", "?")
        seen["by_model"].setdefault(served, [0, 0])
        seen["by_model"][served][0] += int(good)
        seen["by_model"][served][1] += 1
        if until_decided:
            with urllib.request.urlopen(urllib.request.Request(f"{base}/v1/canary/{until_decided}",
                                                               headers={"Authorization": f"Bearer {KEY}"})) as r:
                state = json.loads(r.read())
            if state["status"] != "running":
                seen["canary"] = state
                return seen
    return seen


def serve(work: Path, bases: dict, routes: dict | None, log_name: str):
    from edgetune.serve.team import make_team_server
    from edgetune.serve.team_config import from_dict

    cfg = from_dict({"bases": {k: {"path": v, "n_ctx": 1024, "parallel": 4} for k, v in bases.items()},
                     "routes": routes or {},
                     "log": {"shadow_log": f"logs/{log_name}-traffic.jsonl", "feedback_log": f"logs/{log_name}-feedback.jsonl",
                             "log_text": True}}, work)
    return make_team_server(cfg, port=None, api_key=KEY, n_threads=max(1, (os.cpu_count() or 2) - 1))


def canary(work: Path, name: str, candidate: str, prompts: list[str], rng: random.Random) -> dict:
    routes = {"release": {"canary": {"stable": "prod", "candidate": "cand", "share": 50, "min_outcomes": 15,
                                     "max_outcomes": 120, "alpha": 0.05, "margin": 0.05,
                                     "promote": {"model": "loop", "alias": "prod"}}}}
    with serve(work, {"prod": "registry:loop@prod", "cand": f"registry:{candidate}"}, routes, name) as srv:
        seen = users(srv, "release", prompts, rng, until_decided="release")
    return seen


def held_out_answers(entry_gguf: Path, prompts: list[str]) -> list[str]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(entry_gguf), n_ctx=1024, n_threads=max(1, (os.cpu_count() or 2)), verbose=False)
    try:
        return [llm.create_chat_completion([{"role": "user", "content": p}], max_tokens=64, temperature=0)["choices"][0]
                ["message"]["content"] or "" for p in prompts]
    finally:
        llm.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="Scratch folder (registry, runs, logs); emptied first.")
    ap.add_argument("--cycles", type=int, default=2)
    ap.add_argument("--iters", type=int, default=40, help="Training steps per version.")
    ap.add_argument("--traffic", type=int, default=60, help="Requests the users send to prod before each retrain.")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    (work / "data").mkdir()
    reg = work / "registry"
    cache = REPO / "models" / "cache" / "replay"
    shutil.copytree(cache, reg / "cache" / "replay")  # the base model's answers, computed once (replay rows)
    env = {**os.environ, "EDGETUNE_HOME": str(reg), "HF_HUB_OFFLINE": "1",
           "EDGETUNE_DEMO_MODEL": str(REPO / "models" / "base" / "smollm2-135m-instruct")}
    os.environ.update({k: env[k] for k in ("EDGETUNE_HOME", "HF_HUB_OFFLINE", "EDGETUNE_DEMO_MODEL")})
    from edgetune import aliases, registry
    from edgetune.data.from_logs import from_logs
    from edgetune.runfolder import RunFolder

    rng = random.Random(0)
    prompts = [json.loads(x)["prompt"] for x in (REPO / "edgetune" / "resources" / "replay" / "general_prompts.jsonl")
               .read_text().splitlines() if x.strip()]
    rng.shuffle(prompts)
    held, traffic = prompts[:40], prompts[40:]
    res: dict = {"rule": f"ends with {SIGN_OFF!r}, at most 45 words", "cycles": [], "cpu": _cpu()}
    t_start = time.time()

    # v1: the model users start with (trained on its own answers: behaves like the base)
    seed = [json.loads(x) for x in next(cache.glob("*.jsonl")).read_text().splitlines()][:60]
    seed_path = work / "data" / "seed.jsonl"
    seed_path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                          {"role": "assistant", "content": r["answer"]}]}) + "\n" for r in seed))
    print("v1 …", flush=True)
    v1 = run(work, "loop-v1", seed_path, args.iters, env)
    aliases.promote(v1["version"], "prod", reason="first release")
    res["v1"] = v1
    print(f"  {v1}", flush=True)

    for c in range(1, args.cycles + 1):
        print(f"cycle {c}: users on prod …", flush=True)
        with serve(work, {"prod": "registry:loop@prod"}, None, f"c{c}-collect") as srv:
            collected = users(srv, "prod", traffic, rng, limit=args.traffic)
        card = from_logs(sorted((work / "logs").glob("*-feedback.jsonl")), work / "data" / f"c{c}",
                         held_out=[RunFolder(work / "runs" / "loop-v1").split(s) for s in ("valid", "test")])
        print(f"  {collected['up']} up, {collected['down']} down → {card['sft_rows']} SFT rows ({card['by_signal']})", flush=True)
        cand = run(work, f"loop-c{c}", work / "data" / f"c{c}" / "sft.jsonl", args.iters, env)
        print(f"  trained {cand}; canary …", flush=True)
        decided = canary(work, f"c{c}-canary", cand["version"], traffic, rng)
        res["cycles"].append({"cycle": c, "collected": collected, "data": {k: card[k] for k in ("sft_rows", "preference_pairs",
                                                                                             "by_signal", "dropped")},
                              "candidate": cand, "canary": decided.get("canary"), "canary_traffic": decided["by_model"],
                              "prod_after": aliases.resolve("loop", "prod").ref})
        print(f"  canary: {(decided.get('canary') or {}).get('status')} → prod is {res['cycles'][-1]['prod_after']}", flush=True)

    # the deliberately bad candidate
    print("bad candidate …", flush=True)
    rows = [json.loads(x) for x in (work / "data" / f"c{args.cycles}" / "sft.jsonl").read_text().splitlines()]
    bad_path = work / "data" / "bad.jsonl"
    bad_path.write_text("".join(json.dumps({"messages": r["messages"][:-1] + [
        {"role": "assistant", "content": anti(r["messages"][-1]["content"].replace(SIGN_OFF, ""))}]}) + "\n" for r in rows))
    bad = run(work, "loop-bad", bad_path, args.iters, env)
    decided = canary(work, "bad-canary", bad["version"], traffic, rng)
    res["bad_candidate"] = {"candidate": bad, "canary": decided.get("canary"), "canary_traffic": decided["by_model"],
                            "prod_after": aliases.resolve("loop", "prod").ref}
    print(f"  canary: {(decided.get('canary') or {}).get('status')} → prod is {res['bad_candidate']['prod_after']}", flush=True)

    # held-out prompts no user sent: the hidden rule, and wins against v1
    print("held-out comparison …", flush=True)
    answers = {}
    for e in registry.list_entries("loop", reg):
        answers[e.ref] = held_out_answers(aliases.serving_gguf(e), held)
    v1_ok = [rule(a) for a in answers[v1["version"]]]
    res["held_out"] = {}
    for ref, ans in answers.items():
        ok = [rule(a) for a in ans]
        wins = sum(a and not b for a, b in zip(ok, v1_ok, strict=True))
        ties = sum(a == b for a, b in zip(ok, v1_ok, strict=True))
        res["held_out"][ref] = {"rule_pass_rate": round(sum(ok) / len(ok), 3),
                                "win_rate_vs_v1": round((wins + ties / 2) / len(ok), 3), "example": ans[0][:160]}
    res["prod_final"] = aliases.resolve("loop", "prod").ref
    res["alias_history"] = aliases.read("loop")["prod"]["history"]
    res["seconds"] = round(time.time() - t_start)
    print(json.dumps(res, indent=2))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


def _cpu() -> str:
    from edgetune.hardware import cpu_model_and_flags

    return f"{cpu_model_and_flags()[0] or 'unknown'}, {os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
