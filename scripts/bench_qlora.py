"""Benchmark on a CUDA GPU: 4-bit QLoRA vs bf16 LoRA through edgetune's torch backend.

Builds a random-weight Llama model (default about 1.1B parameters: hidden 2048, 16 layers) with
the demo model's tokenizer, so nothing is downloaded, and fine-tunes it on the shipped demo data
once per method, each in its own child process. Prints, per method: peak GPU memory allocated by
torch, training tokens/s (real tokens, packed batches), first and last training loss.

    python scripts/bench_qlora.py --tokenizer models/base/smollm2-135m-instruct --steps 20

Random weights make the losses meaningless as quality figures; they only show that both runs
learn (loss falls) and what each costs. Needs CUDA and bitsandbytes; exits 2 without them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "edgetune" / "resources" / "demo" / "support_tickets.jsonl"


def build_model(out: Path, tokenizer: Path, hidden: int, layers: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                      vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"model: random Llama, {n / 1e9:.2f}B parameters, hidden {hidden}, {layers} layers", flush=True)


def one(method: str, model: Path, data: Path, out: Path, steps: int) -> dict:
    import torch

    from edgetune.config import TrainConfig
    from edgetune.train import train

    cfg = TrainConfig(backend="torch", method=method, iters=steps, batch_size=8, max_seq_len=256,
                      eval_every=0, save_every=10_000, learning_rate=2e-4)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    res = train(model, data, out, cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return {"method": method, "device": res.device, "precision": res.precision, "steps": res.steps,
            "tokens_per_s": round(res.tokens_seen / res.wall_s, 1), "wall_s": round(res.wall_s, 1),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
            "first_loss": round(losses[0], 3), "last_loss": round(losses[-1], 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=str(REPO / "models" / "base" / "smollm2-135m-instruct"))
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--methods", default="lora,qlora")
    ap.add_argument("--only", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.only:
        w = Path(a.work)
        print("RESULT " + json.dumps(one(a.only, w / "model", w / "data", w / f"run-{a.only}", a.steps)), flush=True)
        return 0

    try:
        import bitsandbytes  # noqa: F401
        import torch
    except ImportError as exc:
        print(f"needs torch and bitsandbytes: {exc}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}")

    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        build_model(w / "model", Path(a.tokenizer), a.hidden, a.layers)
        rows = DEMO_DATA.read_text().splitlines()
        (w / "data").mkdir()
        (w / "data" / "train.jsonl").write_text("\n".join(rows[:-32]) + "\n")
        (w / "data" / "valid.jsonl").write_text("\n".join(rows[-32:]) + "\n")
        results = []
        for m in a.methods.split(","):
            p = subprocess.run([sys.executable, __file__, "--only", m, "--work", str(w), "--steps", str(a.steps)],
                               capture_output=True, text=True)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if p.returncode or not line:
                print(f"{m} failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}", file=sys.stderr)
                return 1
            results.append(json.loads(line[7:]))
    print(f"{'method':<7} {'precision':<9} {'steps':>5} {'tok/s':>9} {'peak GPU GiB':>12} {'loss first→last':>16}")
    for r in results:
        print(f"{r['method']:<7} {r['precision']:<9} {r['steps']:>5} {r['tokens_per_s']:>9.0f} {r['peak_gpu_gib']:>12.2f} "
              f"{r['first_loss']:>7.3f}→{r['last_loss']:.3f}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
