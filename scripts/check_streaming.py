#!/usr/bin/env python3
"""Does the streamed fp32 reference change any result? Whole model vs one block at a time, on a real model.

    python scripts/check_streaming.py                      # the demo model
    python scripts/check_streaming.py --model DIR --imatrix-tokens 3000
    python scripts/check_streaming.py --gguf Q4.gguf       # + llama.cpp with and without weight repacking

1. the verification corpus's logits (export/verify.py) from a whole-model fp32 forward vs
   :func:`edgetune.streaming.logits`: max |Δlogit|, and the f16 GGUF's verification figures
   (top-1, mean KL) against each;
2. the importance matrix from forward hooks on the whole fp32 model (how edgetune computed it
   before streaming) vs :func:`edgetune.export.imatrix.compute_imatrix`: max relative difference;
3. with --gguf: anonymous memory after loading and prefill time of 200 tokens, llama.cpp's
   repacked weights vs mmapped only (what the measuring contexts use), and the logits' difference.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def whole_logits(model_dir, lists):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return [m(torch.tensor([ids])).logits[0].numpy() for ids in lists]


def whole_imatrix(model_dir, texts, max_tokens):
    """The importance matrix as edgetune computed it before streaming: hooks on the whole fp32 model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgetune.export.imatrix import BATCH_TOKENS, CHUNK_SIZE, _batches, gguf_weight_names

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids, total = [], 0
    for t in texts:
        x = tok(t).input_ids[:CHUNK_SIZE][: max_tokens - total]
        if not x:
            break
        ids.append(x)
        total += len(x)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    sums: dict[str, np.ndarray] = {}
    mask = {}

    def hook(g):
        def fn(_m, args):
            x = args[0][mask["m"]].double()
            sums[g] = sums.get(g, 0) + (x * x).sum(0).numpy()
        return fn

    mods = dict(model.named_modules())
    for n, g in gguf_weight_names(model, model_dir).items():
        mods[n].register_forward_pre_hook(hook(g))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with torch.no_grad():
        for batch in _batches(ids, BATCH_TOKENS):
            n = max(len(b) for b in batch)
            att = torch.tensor([[1] * len(b) + [0] * (n - len(b)) for b in batch])
            mask["m"] = att.bool()
            model(input_ids=torch.tensor([b + [pad] * (n - len(b)) for b in batch]), attention_mask=att, use_cache=False)
    return sums, total


REPACK_PROBE = r"""
import sys, time, numpy as np
from edgetune.llamacpp import load_llama
def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) / 1e6
llm = load_llama(sys.argv[1], repack=sys.argv[2] == "on")
loaded = anon()
ids = list(range(100, 300))
t = time.time(); llm.eval(ids); dt = time.time() - t
np.save(sys.argv[3], np.array(llm.scores[: len(ids)]))
print(f"{loaded:.2f} {dt:.2f}")
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: the demo model)")
    ap.add_argument("--imatrix-tokens", type=int, default=3000)
    ap.add_argument("--gguf", default=None, help="a quantized GGUF for the repack comparison")
    args = ap.parse_args()
    from edgetune import streaming
    from edgetune.data.template import load_tokenizer
    from edgetune.eval.divergence import combine, drift
    from edgetune.export.imatrix import calibration_texts, compute_imatrix
    from edgetune.export.verify import REL_NEAR_TIE, corpus_token_lists
    from edgetune.paths import demo_model_dir

    model = Path(args.model) if args.model else demo_model_dir()
    tok = load_tokenizer(model)
    lists = corpus_token_lists(tok)
    t0 = time.time()
    ref = whole_logits(model, lists)
    t1 = time.time()
    got = streaming.logits(model, lists)
    t2 = time.time()
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ref, got, strict=True))
    print(f"logits, {sum(len(x) for x in lists)} positions: max |whole - streamed| = {diff:.3g} "
          f"(whole {t1 - t0:.1f} s, streamed {t2 - t1:.1f} s)")
    import tempfile

    from edgetune.export.gguf import convert
    from edgetune.llamacpp import gguf_logits, load_llama

    with tempfile.TemporaryDirectory() as tmp:  # the f16 verification's figures with either reference
        f16 = convert(model, Path(tmp) / "m-f16.gguf", "f16", verify=False, show_progress=False)
        llm = load_llama(f16)
        test = gguf_logits(llm, lists)
        llm.close()
    for label, logits in (("whole", ref), ("streamed", got)):
        spread = float(np.mean([r.std() for r in logits]))
        row = combine([drift(r, t, "x", REL_NEAR_TIE["f16"] * spread) for r, t in zip(logits, test, strict=True)], label)
        print(f"  f16 GGUF verification against the {label} reference: top-1 {row.top1:.6f}, mean KL {row.mean_kl:.6e}, "
              f"max |Δlogit| {row.max_abs:.6f}")

    calib = ROOT / "edgetune" / "resources" / "demo" / "support_tickets.jsonl"
    texts = calibration_texts(calib, tok)
    old, n = whole_imatrix(model, texts, args.imatrix_tokens)
    new = compute_imatrix(model, texts, max_tokens=args.imatrix_tokens, show_progress=False)
    rel = max(float(np.abs(old[k] - new.sum2[k]).max() / np.abs(old[k]).max()) for k in old)
    print(f"imatrix, {n} tokens, {len(old)} tensors: max relative |whole - streamed| = {rel:.3g}")

    if args.gguf:
        res = {}
        for mode in ("on", "off"):
            out = subprocess.run([sys.executable, "-c", REPACK_PROBE, args.gguf, mode, f"/tmp/repack-{mode}.npy"],
                                 capture_output=True, text=True, check=True, env={**os.environ}).stdout.split()
            res[mode] = (float(out[0]), float(out[1]))
        d = float(np.abs(np.load("/tmp/repack-on.npy") - np.load("/tmp/repack-off.npy")).max())
        print(f"llama.cpp {Path(args.gguf).name}: repack on {res['on'][0]:.2f} GB anon after load, prefill 200 tokens "
              f"{res['on'][1]:.2f} s; off {res['off'][0]:.2f} GB, {res['off'][1]:.2f} s; max |Δlogit| {d:.3g}")
    return 0 if diff <= 1e-5 * max(float(np.abs(r).max()) for r in ref) and rel <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
