"""Benchmark: edgetune's torch LoRA path vs a plain transformers Trainer + PEFT run, on CPU.

Both fine-tune the demo model (SmolLM2-135M-Instruct) with the same LoRA settings (r 16, alpha 32,
dropout 0.05, all attention + MLP linears), lr 2e-4 cosine with 5% warmup, batch 8, max sequence
256, for the same number of optimizer steps (a step is 8 padded examples for the plain run, 8 packed
rows of up to 256 tokens for edgetune), completion-only loss. Each run is a child process (so its
peak RSS is its own), plain first, then edgetune. Reported: real (non-pad) tokens per second of
training, peak RSS, and the validation loss of each adapter measured by the same function here.

    python scripts/bench_train.py --steps 6 --threads 1
    python scripts/bench_train.py --steps 8 --threads 1 --packed-rows 4 --dropout 0   # equal examples/step

By default both runs compute in the dtype edgetune's precision policy picks for this CPU
(``--plain-dtype policy``; fp32 on a CPU without fast bf16), so the ratio measures engineering,
not a dtype choice. ``--packed-rows`` sets edgetune's packed rows per step (default: --batch);
on the demo data two examples fill a 256-token row, so ``--packed-rows 4`` with ``--batch 8``
gives both runs about the same examples, tokens and activation memory per step.

``--objective dpo``: TRL's ``DPOTrainer`` with PEFT (the same LoRA, lr, schedule, beta 0.1, sigmoid
loss, reference = adapter disabled) vs ``edgetune train --objective dpo`` on the demo preference
pairs (support_ticket_pairs.jsonl), ``--batch`` pairs a step for both. Reported: tokens/s (TRL's
own count of attended tokens, chosen + rejected; edgetune's real tokens), the mean train loss over
the steps, and the held-out DPO loss of each adapter measured by the same function here.

    python scripts/bench_train.py --objective dpo --steps 6 --batch 4 --threads 1

``--objective grpo``: TRL's ``GRPOTrainer`` with PEFT vs ``edgetune train --objective grpo`` on the
demo tickets' prompts, ``--batch`` prompts x ``--generations`` sampled completions a step for both
(temperature 1, ``--completion-len`` new tokens, beta 0, loss_type dapo, lr 2e-4 cosine), rewarded by
the same plain function defined here (:func:`bench_reward`: the share of the reference JSON's fields
the answer gets right + 0.25 if it is JSON; edgetune loads it as ``--reward scripts/bench_train.py:bench_reward``).
Reported: tokens/s counting sampled plus trained tokens for both (TRL: its ``num_tokens``, prompt +
completion, plus the completions' lengths), and the mean reward over the steps (equal work means
nothing if one run learns less).

    python scripts/bench_train.py --objective grpo --steps 6 --batch 2 --generations 4 --threads 1

(On a shared 2-core machine use --threads 1: OpenMP threads competing with other processes ran
~10x slower than one thread in our measurements.)

The plain run uses library defaults (transformers 5 loads the saved dtype; Trainer pads each batch
to its longest example and computes the LM head for every token). No edgetune code is imported by
the plain child.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "edgetune" / "resources" / "demo" / "support_tickets.jsonl"
DEMO_PAIRS = DEMO_DATA.with_name("support_ticket_pairs.jsonl")
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def plain_encode(tok, row, seq):
    """Completion-only labels the way a plain HF script does it: prompt prefix masked with -100."""
    msgs = row["messages"]
    prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs, tokenize=False)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    f = tok(full, add_special_tokens=False)["input_ids"][:seq]
    labels = ([-100] * len(p) + f[len(p):])[: len(f)]
    return {"input_ids": f, "attention_mask": [1] * len(f), "labels": labels}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def run_plain(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    rows = [json.loads(x) for x in Path(a.data, "train.jsonl").read_text().splitlines()]
    enc = [plain_encode(tok, r, a.seq) for r in rows]
    ds = Dataset.from_list(enc)
    kw = {} if a.plain_dtype == "auto" else {"dtype": getattr(torch, a.plain_dtype)}
    lora = dict(LORA, lora_dropout=a.dropout)
    model = AutoModelForCausalLM.from_pretrained(a.model, **kw)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    steps = a.steps
    args = TrainingArguments(
        output_dir=str(Path(a.out) / "trainer"), per_device_train_batch_size=a.batch, max_steps=steps,
        learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=int(round(0.05 * steps)), logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, seed=42, dataloader_num_workers=0, disable_tqdm=True,
    )
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    seen = {"tokens": 0}

    def counting_collate(features):  # exact count of the real tokens the Trainer trains on
        seen["tokens"] += sum(len(f["input_ids"]) for f in features)
        return collate(features)

    tr = Trainer(model=model, args=args, train_dataset=ds, data_collator=counting_collate)
    t0 = time.perf_counter()
    out = tr.train()
    dt = time.perf_counter() - t0
    model.save_pretrained(str(Path(a.out) / "adapter"))
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    tokens = seen["tokens"]
    return {"run": "plain Trainer+PEFT", "steps": out.global_step, "train_s": dt, "tokens": tokens,
            "tok_s": tokens / dt, "last_train_loss": losses[-1] if losses else None,
            "dtype": str(next(model.parameters()).dtype), "peak_rss_gb": peak_rss_gb()}


def _conversational(row: dict) -> dict:
    """A demo pair in TRL's conversational preference layout."""
    return {"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def run_trl_dpo(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    rows = [_conversational(json.loads(x)) for x in Path(a.data, "train.jsonl").read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.plain_dtype))
    args = DPOConfig(
        output_dir=str(Path(a.out) / "trainer"), per_device_train_batch_size=a.batch, max_steps=a.steps, beta=a.beta,
        loss_type=["sigmoid"], learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=int(round(0.05 * a.steps)),
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=42, dataloader_num_workers=0,
        disable_tqdm=True, max_length=a.seq, bf16=a.plain_dtype == "bfloat16", precompute_ref_log_probs=False,
    )
    tr = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                    peft_config=LoraConfig(task_type="CAUSAL_LM", **dict(LORA, lora_dropout=a.dropout)))
    t0 = time.perf_counter()
    out = tr.train()
    dt = time.perf_counter() - t0
    tr.model.save_pretrained(str(Path(a.out) / "adapter"))
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    tokens = int(tr._total_train_tokens)  # TRL's count: attention_mask sums of chosen + rejected rows
    return {"run": "TRL DPOTrainer+PEFT", "steps": out.global_step, "train_s": dt, "tokens": tokens, "tok_s": tokens / dt,
            "last_train_loss": losses[-1] if losses else None, "mean_train_loss": sum(losses) / max(1, len(losses)),
            "dtype": a.plain_dtype, "peak_rss_gb": peak_rss_gb()}


def bench_reward(prompts=None, completions=(), references=(), **_):
    """The GRPO benchmark's reward, plain Python: share of the reference JSON's fields matched + 0.25 if JSON."""

    def parse(text):
        text = (text or "").strip()
        if text.startswith("```"):
            text = text.strip("`").split("\n", 1)[-1]
        try:
            return json.loads(text)
        except ValueError:
            return None

    out = []
    for c, r in zip(completions, references, strict=True):
        got, want = parse(c), parse(r) or {}
        if not isinstance(got, dict):
            out.append(0.0)
            continue
        out.append(0.25 + sum(got.get(k) == v for k, v in want.items()) / max(1, len(want)))
    return out


def run_trl_grpo(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    rows = [json.loads(x) for x in Path(a.data, "train.jsonl").read_text().splitlines()]
    ds = Dataset.from_list([{"prompt": r["messages"][:-1], "reference": r["messages"][-1]["content"]} for r in rows])

    def reward(completions, reference, **kw):
        return bench_reward(None, [c[-1]["content"] if isinstance(c, list) else c for c in completions], reference)

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.plain_dtype))
    args = GRPOConfig(
        output_dir=str(Path(a.out) / "trainer"), per_device_train_batch_size=a.batch * a.generations,
        num_generations=a.generations, max_completion_length=a.completion_len, temperature=1.0, beta=0.0,
        loss_type="dapo", max_steps=a.steps, learning_rate=2e-4, lr_scheduler_type="cosine",
        warmup_steps=int(round(0.05 * a.steps)), logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        seed=42, dataloader_num_workers=0, disable_tqdm=True, bf16=a.plain_dtype == "bfloat16",
    )
    tr = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                     peft_config=LoraConfig(task_type="CAUSAL_LM", **dict(LORA, lora_dropout=a.dropout)))
    t0 = time.perf_counter()
    out = tr.train()
    dt = time.perf_counter() - t0
    tr.model.save_pretrained(str(Path(a.out) / "adapter"))
    logs = [h for h in tr.state.log_history if "reward" in h]
    trained = int(max(h.get("num_tokens", 0) for h in tr.state.log_history))
    sampled = int(round(sum(h["completions/mean_length"] for h in logs) * a.batch * a.generations))
    tokens = trained + sampled
    return {"run": "TRL GRPOTrainer+PEFT", "steps": out.global_step, "train_s": dt, "tokens": tokens, "tok_s": tokens / dt,
            "sampled_tokens": sampled, "mean_reward": sum(h["reward"] for h in logs) / max(1, len(logs)),
            "dtype": a.plain_dtype, "peak_rss_gb": peak_rss_gb()}


def run_edgetune(a) -> dict:
    import torch

    from edgetune.config import TrainConfig
    from edgetune.train import train

    torch.set_num_threads(a.threads)
    dpo = a.objective in ("dpo", "grpo")
    grpo = dict(num_generations=a.generations, max_completion_length=a.completion_len, temperature=1.0,
                loss_type="dapo", rewards=[f"{Path(__file__).resolve()}:bench_reward"]) if a.objective == "grpo" else {}
    cfg = TrainConfig(backend="torch", method="lora", batch_size=a.batch if dpo else a.packed_rows or a.batch, max_seq_len=a.seq,
                      objective=a.objective, beta=a.beta if a.objective == "dpo" else None,
                      packing=False if dpo else None, **grpo,
                      iters=a.steps, eval_every=0, save_every=0, learning_rate=2e-4, warmup_ratio=0.05, seed=42,
                      rank=LORA["r"], alpha=LORA["lora_alpha"], dropout=a.dropout,
                      precision={"float32": "fp32", "bfloat16": "bf16"}.get(a.plain_dtype, "auto"))
    r = train(a.model, a.data, a.out, cfg)
    rows = [json.loads(x) for x in Path(a.out, "metrics.jsonl").read_text().splitlines()]
    if a.objective == "grpo":
        return {"run": "edgetune", "steps": r.steps, "train_s": r.extra["train_time_s"], "tokens": r.tokens_seen,
                "tok_s": r.tokens_seen / r.extra["train_time_s"], "precision": r.precision,
                "sampled_tokens": int(round(sum(x["completion_length"] for x in rows) * a.batch * a.generations)),
                "mean_reward": sum(x["reward"] for x in rows) / max(1, len(rows)), "peak_rss_gb": peak_rss_gb()}
    return {"run": "edgetune", "mean_train_loss": sum(x["loss"] for x in rows) / max(1, len(rows)), "steps": r.steps, "train_s": r.extra["train_time_s"], "tokens": r.tokens_seen,
            "tok_s": r.tokens_seen / r.extra["train_time_s"], "last_train_loss": r.final_train_loss,
            "precision": r.precision, "padding_fraction": r.padding_fraction, "peak_rss_gb": peak_rss_gb()}


def val_loss(model_dir: str, adapter: Path, valid: list[dict], seq: int, threads: int) -> float:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter).eval()
    tot = n = 0.0
    with torch.no_grad():
        for row in valid:
            e = plain_encode(tok, row, seq)
            ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
            logits = model(ids).logits[0, :-1]
            tgt = labels[0, 1:]
            tot += torch.nn.functional.cross_entropy(logits, tgt, ignore_index=-100, reduction="sum").item()
            n += int((tgt != -100).sum())
    return tot / n


def val_dpo_loss(model_dir: str, adapter: Path, pairs: list[dict], seq: int, threads: int, beta: float) -> float:
    """Mean sigmoid DPO loss on held-out pairs: completion tokens (after the generation prompt) summed,
    reference = the same model with the adapter disabled. Plain transformers + PEFT, no edgetune code."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter).eval()

    def logp(prompt, answer):
        e = plain_encode(tok, {"messages": prompt + [{"role": "assistant", "content": answer}]}, seq)
        ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])[0, 1:]
        lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        keep = labels != -100
        return lp[keep].gather(-1, labels[keep].unsqueeze(-1)).sum()

    total = 0.0
    with torch.no_grad():
        for p in pairs:
            pol = logp(p["prompt"], p["chosen"]) - logp(p["prompt"], p["rejected"])
            with model.disable_adapter():
                ref = logp(p["prompt"], p["chosen"]) - logp(p["prompt"], p["rejected"])
            total += float(-F.logsigmoid(beta * (pol - ref)))
    return total / len(pairs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "base" / "smollm2-135m-instruct"))
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps for each run")
    ap.add_argument("--plain-dtype", default="policy", choices=["policy", "auto", "float32", "bfloat16"],
                    help="dtype of both runs: policy = what edgetune.precision picks for training here (default); "
                         "auto = the plain run loads the saved dtype and edgetune uses its policy")
    ap.add_argument("--packed-rows", type=int, default=None, help="edgetune's packed rows per step (default --batch)")
    ap.add_argument("--dropout", type=float, default=LORA["lora_dropout"], help="LoRA dropout of both runs")
    ap.add_argument("--valid", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--objective", choices=["sft", "dpo", "grpo"], default="sft",
                    help="dpo: TRL's DPOTrainer + PEFT vs edgetune --objective dpo on the demo preference pairs; "
                         "grpo: TRL's GRPOTrainer + PEFT vs edgetune --objective grpo on the demo tickets")
    ap.add_argument("--generations", type=int, default=4, help="GRPO completions per prompt")
    ap.add_argument("--completion-len", type=int, default=48, help="GRPO max new tokens per completion")
    ap.add_argument("--beta", type=float, default=0.1, help="DPO beta of both runs")
    ap.add_argument("--only", choices=["plain", "edgetune"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.plain_dtype == "policy":
        from edgetune.precision import decide

        a.plain_dtype = {"fp32": "float32", "bf16": "bfloat16"}[decide("train", "cpu").dtype]
    if a.only:
        trl = {"dpo": run_trl_dpo, "grpo": run_trl_grpo}.get(a.objective, run_plain)
        res = run_edgetune(a) if a.only == "edgetune" else trl(a)
        print("BENCH " + json.dumps(res))
        return

    dpo, grpo = a.objective == "dpo", a.objective == "grpo"
    rows = [json.loads(x) for x in (DEMO_PAIRS if dpo else DEMO_DATA).read_text().splitlines()]
    # enough for one epoch of either run (SFT: edgetune packs ~2 per row; DPO: batch pairs a step, no packing)
    n_train = a.steps * a.batch * (1 if dpo or grpo else 3)
    train_rows, valid_rows = rows[:n_train], rows[n_train : n_train + a.valid]
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    data = work / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    results = []
    for which in ("plain", "edgetune"):
        out = work / which
        cmd = [sys.executable, __file__, "--only", which, "--model", a.model, "--data", str(data), "--out", str(out),
               "--batch", str(a.batch), "--seq", str(a.seq), "--threads", str(a.threads), "--steps", str(a.steps),
               "--plain-dtype", a.plain_dtype, "--dropout", str(a.dropout), "--objective", a.objective, "--beta", str(a.beta),
               "--generations", str(a.generations), "--completion-len", str(a.completion_len)]
        if a.packed_rows:
            cmd += ["--packed-rows", str(a.packed_rows)]
        print(f"running {which} ...", file=sys.stderr, flush=True)
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(a.threads)))
        line = [x for x in p.stdout.splitlines() if x.startswith("BENCH ")]
        if p.returncode or not line:
            sys.exit(f"{which} failed:\n{p.stderr[-4000:]}")
        res = json.loads(line[-1][6:])
        if grpo:  # the comparison is the reward reached, not a loss
            results.append(res)
            continue
        res["val_loss"] = (val_dpo_loss(a.model, out / "adapter", valid_rows, a.seq, a.threads, a.beta) if dpo
                           else val_loss(a.model, out / "adapter", valid_rows, a.seq, a.threads))
        results.append(res)
    plain, et = results
    with os.popen("uptime") as fh:
        load = fh.read().strip()
    from edgetune.hardware import cpu_model_and_flags

    cpu = cpu_model_and_flags()[0]
    if grpo:
        print(f"\nobjective grpo, steps {a.steps}, {a.batch} prompts x {a.generations} completions a step, "
              f"<= {a.completion_len} new tokens, dtype {a.plain_dtype}, threads {a.threads}; CPU {cpu}; load: {load}")
        print(f"{'run':22s} {'steps':>5s} {'train s':>8s} {'tokens':>7s} {'sampled':>8s} {'tok/s':>8s} {'mean reward':>11s} {'peak RSS GB':>11s}")
        for r in results:
            print(f"{r['run']:22s} {r['steps']:5d} {r['train_s']:8.1f} {r['tokens']:7d} {r['sampled_tokens']:8d} "
                  f"{r['tok_s']:8.1f} {r['mean_reward']:11.3f} {r['peak_rss_gb']:11.2f}")
        ratio = et["tok_s"] / plain["tok_s"]
        print(f"\nspeed-up (sampled + trained tokens/s): {ratio:.2f}x   mean reward: TRL {plain['mean_reward']:.3f} "
              f"edgetune {et['mean_reward']:.3f}")
        print(json.dumps({"objective": "grpo", "plain": plain, "edgetune": et, "speedup": ratio}))
        return
    print(f"\nobjective {a.objective}, steps {a.steps}, valid {len(valid_rows)}, batch {a.batch} (edgetune packed rows {a.packed_rows or a.batch}), "
          f"max seq {a.seq}, dtype {a.plain_dtype}, dropout {a.dropout}, threads {a.threads}; CPU {cpu}; load: {load}")
    print(f"{'run':22s} {'steps':>5s} {'train s':>8s} {'tokens':>7s} {'tok/s':>8s} {'val loss':>9s} {'peak RSS GB':>11s}")
    for r in results:
        print(f"{r['run']:22s} {r['steps']:5d} {r['train_s']:8.1f} {r['tokens']:7d} {r['tok_s']:8.1f} "
              f"{r['val_loss']:9.4f} {r['peak_rss_gb']:11.2f}")
    ratio = et["tok_s"] / plain["tok_s"]
    dloss = (et["val_loss"] - plain["val_loss"]) / plain["val_loss"]
    print(f"\nspeed-up (tokens/s): {ratio:.2f}x   val loss difference: {dloss:+.1%}")
    extra = {}
    if dpo:
        extra["mean_train_loss_rel_diff"] = (et["mean_train_loss"] - plain["mean_train_loss"]) / plain["mean_train_loss"]
        print(f"mean train DPO loss: TRL {plain['mean_train_loss']:.4f}  edgetune {et['mean_train_loss']:.4f} "
              f"({extra['mean_train_loss_rel_diff']:+.1%})")
    print(json.dumps({"objective": a.objective, "plain": plain, "edgetune": et, "speedup": ratio, "val_loss_rel_diff": dloss, **extra}))


if __name__ == "__main__":
    main()
