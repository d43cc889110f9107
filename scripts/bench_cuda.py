"""Side-by-side LoRA/QLoRA training benchmark: plain transformers+PEFT, edgetune, Unsloth (issue 17).

Each arm runs in its own child process on the same GPU, the same random-weight Llama-architecture
model (built from a config: nothing is downloaded) and the same data: the shipped support-ticket
chats rendered through the demo tokenizer's chat template, every token scored (plain causal LM
loss, so the three losses are the same quantity).

    python scripts/bench_cuda.py --sizes 1b --methods lora,qlora        # ~1.2B model, a few minutes on an H100/H200
    python scripts/bench_cuda.py --sizes 8b --methods qlora --longest   # 8B-class, plus the longest batch-1 sequence
    python scripts/bench_cuda.py --tiny --device cpu --steps 3          # CPU smoke run (CI keeps this path alive)

Arms (each with LoRA r=16, alpha=32, dropout 0 on all linear layers of attention and MLP; bf16; SDPA):
  plain     transformers ``Trainer`` + PEFT (+ bitsandbytes NF4 and ``prepare_model_for_kbit_training``
            for QLoRA), library defaults otherwise; data pre-packed into full rows of --seq tokens.
  edgetune  ``edgetune.train.train`` with the torch backend, packing on (its padding-free packing).
  unsloth   ``unsloth.FastLanguageModel`` + the same ``Trainer`` and rows as plain, where unsloth imports.

Reported per arm: steady-state tokens/s (steps after --warmup), peak GPU memory allocated by torch,
model-FLOPs utilisation = tokens/s x (6 N + 12 L d s) / peak bf16 FLOP/s (N = parameters outside the
embeddings, L layers, d hidden, s sequence; the GPU's dense bf16 peak from the table below or
--peak-tflops), first and last loss (mean of the last 3 steps). With --longest, each arm also
reports the longest sequence it trains at batch 1 (doubling from --seq, then bisection to 1024
tokens), all in one process per arm. Exit 2 when a requested GPU arm cannot run at all here.
Nothing is installed: unsloth / bitsandbytes must already be importable (carry wheels to a GPU box).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "edgetune" / "resources" / "demo" / "support_tickets.jsonl"
TOKENIZER = REPO / "tests" / "fixtures" / "smollm2-tokenizer"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Llama-architecture shapes: 1b ~ Llama 3.2 1B, 8b ~ Llama 3.1 8B (vocab from the demo tokenizer)
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
}
PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "4090": 165, "3090": 71}


def build_model(out: Path, size: str, seq: int, device: str) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = LlamaConfig(**SIZES[size], vocab_size=len(tok), max_position_embeddings=max(seq, 4096) * 32,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    emb = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    n = sum(p.numel() for p in model.parameters())
    return {"params": n, "non_embedding": n - emb, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size}


def write_data(work: Path) -> None:
    """Demo chats as ``text`` rows (all tokens scored) for edgetune, plus their token ids for the Trainer arms."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    texts = [tok.apply_chat_template(json.loads(x)["messages"], tokenize=False) for x in DEMO_DATA.read_text().splitlines()]
    (work / "data").mkdir(parents=True, exist_ok=True)
    rows = [json.dumps({"text": t}) for t in texts]
    (work / "data" / "train.jsonl").write_text("\n".join(rows[:-16]) + "\n")
    (work / "data" / "valid.jsonl").write_text("\n".join(rows[-16:]) + "\n")
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts[:-16]]
    (work / "ids.json").write_text(json.dumps(ids))


def packed_rows(work: Path, seq: int, n_rows: int) -> list[list[int]]:
    """Concatenate the tokenized chats and cut full rows of ``seq`` tokens (repeating the data as needed)."""
    flat = [t for row in json.loads((work / "ids.json").read_text()) for t in row]
    need = seq * n_rows
    flat = (flat * (need // len(flat) + 1))[:need]
    return [flat[i * seq:(i + 1) * seq] for i in range(n_rows)]


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")


def load_trainer_model(arm: str, method: str, model_dir: Path, seq: int, device: str):
    import torch

    if arm == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(model_name=str(model_dir), max_seq_length=seq, dtype=torch.bfloat16,
                                                     load_in_4bit=method == "qlora")
        return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                                bias="none", use_gradient_checkpointing="unsloth")
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    kw: dict = {"attn_implementation": "sdpa", "dtype": torch.bfloat16 if device == "cuda" else torch.float32}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
        kw["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    if method == "qlora":
        model = prepare_model_for_kbit_training(model)  # library default: gradient checkpointing on
    elif device == "cuda":
        model = model.to("cuda")
    return get_peft_model(model, _lora_config())


class _Timer:
    """TrainerCallback-style step timer (created lazily so this module imports without transformers)."""

    def __new__(cls, device: str):
        import torch
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self):
                self.times: list[float] = []
                self.t0 = 0.0

            def _sync(self):
                if device == "cuda":
                    torch.cuda.synchronize()

            def on_step_begin(self, args, state, control, **kw):
                self._sync()
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self._sync()
                self.times.append(time.perf_counter() - self.t0)

        return Timer()


def run_trainer_arm(arm: str, method: str, work: Path, a) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = load_trainer_model(arm, method, work / "model", a.seq, a.device)
    rows = packed_rows(work, a.seq, a.steps * a.batch * a.grad_accum)
    ds = [{"input_ids": torch.tensor(r), "labels": torch.tensor(r), "attention_mask": torch.ones(len(r), dtype=torch.long)}
          for r in rows]
    timer = _Timer(a.device)
    args = TrainingArguments(output_dir=str(work / f"out-{arm}-{method}"), per_device_train_batch_size=a.batch,
                             gradient_accumulation_steps=a.grad_accum, max_steps=a.steps, learning_rate=2e-4,
                             logging_steps=1, save_strategy="no", report_to=[], bf16=a.device == "cuda",
                             use_cpu=a.device == "cpu", dataloader_num_workers=0, seed=42, warmup_steps=0)
    tr = Trainer(model=model, args=args, train_dataset=ds, data_collator=default_data_collator, callbacks=[timer])
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    steady = timer.times[a.warmup:] or timer.times
    tokens = a.batch * a.grad_accum * a.seq
    return {"tokens_per_s": tokens * len(steady) / sum(steady), "losses": losses}


def run_edgetune_arm(method: str, work: Path, a) -> dict:
    from edgetune.config import TrainConfig
    from edgetune.train import train

    cfg = TrainConfig(backend="torch", method=method, objective="sft", iters=a.steps, batch_size=a.batch,
                      grad_accum=a.grad_accum, max_seq_len=a.seq, packing=True, rank=16, alpha=32.0, dropout=0.0,
                      learning_rate=2e-4, warmup_ratio=0.0, eval_every=0, save_every=10**9,
                      gradient_checkpointing=method == "qlora" or a.checkpointing)
    out = work / f"out-edgetune-{method}"
    train(work / "model", work / "data", out, cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tok_s" in r and "loss" in r]
    cum = [0] + [r["tokens"] for r in steps]  # rows carry cumulative tokens and the step's tokens/s
    per_step = [(cum[i + 1] - cum[i], steps[i]["tok_s"]) for i in range(len(steps))]
    steady = per_step[a.warmup:] or per_step
    return {"tokens_per_s": sum(n for n, _ in steady) / sum(n / t for n, t in steady), "losses": [r["loss"] for r in steps]}


def longest_seq(arm: str, method: str, work: Path, a) -> int:
    """Longest sequence trained at batch 1 (forward + backward + optimizer step) before running out of memory.

    The Trainer arms run their model's own loss (``labels=``); edgetune runs its backend's step, so its
    memory savings (LM head only at scored positions, its checkpointing) count as they do in training."""
    import numpy as np
    import torch

    flat = [t for row in json.loads((work / "ids.json").read_text()) for t in row]
    if arm == "edgetune":
        from edgetune.config import TrainConfig
        from edgetune.train.batching import IGNORE, Batch
        from edgetune.train.objectives import get
        from edgetune.train.select import Choice
        from edgetune.train.torch_backend import TorchBackend

        sft_loss = get("sft").loss_for("torch")

        cfg = TrainConfig(backend="torch", method=method, rank=16, alpha=32.0, dropout=0.0, max_seq_len=a.longest_cap,
                          gradient_checkpointing=True)
        be = TorchBackend(work / "model", cfg, Choice("torch", "cuda", "bench"), TARGETS)
        be.setup(total_steps=1000, warmup_steps=0)

        def one_step(s: int) -> None:
            ids = np.array([(flat * (s // len(flat) + 1))[:s]], dtype=np.int64)
            labels = np.concatenate([ids[:, 1:], np.full((1, 1), IGNORE)], axis=1)
            pos = np.arange(s, dtype=np.int64)[None]
            be.step([Batch(ids, labels, pos, s, s - 1)], sft_loss)
    else:
        model = load_trainer_model(arm, method, work / "model", a.longest_cap, a.device)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def one_step(s: int) -> None:
            ids = torch.tensor([(flat * (s // len(flat) + 1))[:s]], device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def fits(s: int) -> bool:
        try:
            one_step(s)
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    lo, hi = 0, a.seq
    while hi <= a.longest_cap and fits(hi):
        lo, hi = hi, hi * 2
    if hi > a.longest_cap:
        return lo  # fits everything up to the cap
    while hi - lo > 1024:
        mid = (lo + hi) // 2 // 1024 * 1024
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def child(arm: str, method: str, work: Path, a) -> dict:
    import torch

    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    r = run_edgetune_arm(method, work, a) if arm == "edgetune" else run_trainer_arm(arm, method, work, a)
    info = json.loads((work / "model_info.json").read_text())
    flops_per_token = 6 * info["non_embedding"] + 12 * info["layers"] * info["hidden"] * a.seq
    peak = a.peak_tflops
    if peak is None and a.device == "cuda":
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    losses = r["losses"]
    out = {"arm": arm, "method": method, "tokens_per_s": round(r["tokens_per_s"], 1),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if a.device == "cuda" else None,
           "mfu": round(r["tokens_per_s"] * flops_per_token / (peak * 1e12), 4) if peak else None,
           "first_loss": round(losses[0], 4), "last_loss": round(sum(losses[-3:]) / len(losses[-3:]), 4), "steps": len(losses)}
    if a.longest and a.device == "cuda":
        out["longest_seq_b1"] = longest_seq(arm, method, work, a)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1b", help="comma list of " + ",".join(SIZES))
    ap.add_argument("--methods", default="lora,qlora")
    ap.add_argument("--arms", default="plain,edgetune,unsloth")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of tokens/s")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing for bf16 LoRA in edgetune too")
    ap.add_argument("--longest", action="store_true", help="also search the longest batch-1 sequence per arm (CUDA)")
    ap.add_argument("--longest-cap", type=int, default=131072)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model, seq 128, batch 2 (CPU smoke run)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--only", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.tiny:
        a.sizes, a.seq, a.batch, a.grad_accum, a.warmup = "tiny", 128, 2, 1, 1

    if a.only:
        print("RESULT " + json.dumps(child(a.only[0], a.only[1], Path(a.work), a)), flush=True)
        return 0

    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --device cpu --tiny for the smoke run)", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    print(f"device: {gpu}; torch {torch.__version__}", flush=True)
    methods = [m for m in a.methods.split(",") if m]
    if a.device == "cpu":
        methods = [m for m in methods if m != "qlora"]  # bitsandbytes NF4 needs CUDA
    arms = [x for x in a.arms.split(",") if x]
    results = []
    for size in a.sizes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            w = Path(tmp)
            info = build_model(w / "model", size, a.seq, a.device)
            (w / "model_info.json").write_text(json.dumps(info))
            write_data(w)
            print(f"{size}: random Llama, {info['params'] / 1e9:.2f}B parameters", flush=True)
            for m in methods:
                for arm in arms:
                    argv = [sys.executable, __file__, "--only", arm, m, "--work", str(w)] + _forward(a)
                    p = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
                    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if p.returncode or not line:
                        why = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
                        print(f"{size} {m} {arm}: did not run ({why[0][:200]})", flush=True)
                        results.append({"size": size, "arm": arm, "method": m, "error": why[0][:500]})
                        continue
                    r = {"size": size, **json.loads(line[7:])}
                    results.append(r)
                    print(json.dumps(r), flush=True)
    print_table(results)
    if a.json:
        Path(a.json).write_text(json.dumps({"device": gpu, "seq": a.seq, "batch": a.batch, "grad_accum": a.grad_accum,
                                            "steps": a.steps, "results": results}, indent=2))
    ran = [r for r in results if "error" not in r]
    return 0 if ran else 1


def _forward(a) -> list[str]:
    out = ["--seq", str(a.seq), "--batch", str(a.batch), "--grad-accum", str(a.grad_accum), "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--device", a.device, "--longest-cap", str(a.longest_cap)]
    out += ["--checkpointing"] if a.checkpointing else []
    out += ["--longest"] if a.longest else []
    out += ["--peak-tflops", str(a.peak_tflops)] if a.peak_tflops else []
    return out


def print_table(results: list[dict]) -> None:
    print(f"\n{'size':<5} {'method':<6} {'arm':<9} {'tok/s':>9} {'vs plain':>8} {'peak GiB':>8} {'MFU':>6} "
          f"{'loss first→last':>17} {'longest b1':>10}")
    plain = {(r["size"], r["method"]): r["tokens_per_s"] for r in results if r["arm"] == "plain" and "error" not in r}
    for r in results:
        if "error" in r:
            print(f"{r['size']:<5} {r['method']:<6} {r['arm']:<9} did not run: {r['error'][:80]}")
            continue
        base = plain.get((r["size"], r["method"]))
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{r['size']:<5} {r['method']:<6} {r['arm']:<9} {r['tokens_per_s']:>9.0f} {ratio:>8} {peak:>8} {mfu:>6} "
              f"{r['first_loss']:>8.3f}→{r['last_loss']:<8.3f} {r.get('longest_seq_b1', '-'):>10}")


if __name__ == "__main__":
    sys.exit(main())
