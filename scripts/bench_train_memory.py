"""Benchmark: `edgetune train --dry-run`'s memory estimate vs the measured peak, per model shape.

Builds random-weight Llama-shaped models (transformers ``from_config``, saved in bf16, the demo
tokenizer) under --root, prepares the demo support tickets once with the demo tokenizer, then for
each shape runs ``edgetune train --dry-run --json`` (the estimate) and the same training for
--iters steps under ``shared/tools/peakmem`` (peak *anonymous* memory of the process tree: what
must fit in RAM; mmapped safetensors pages are file-backed and excluded). Prints one table row per
shape: estimated vs measured GB and the error. The estimate compared is ``anon_gb``: the total less
the weights transformers mmaps from the safetensors (file-backed; peakmem reports them as "file").

    flock /tmp/heavy.lock .venv/bin/python scripts/bench_train_memory.py --shapes 135m,1.2b,3b
    .venv/bin/python scripts/bench_train_memory.py --shapes 135m --batch 2 --seq 256 --iters 3

Shapes (all with the demo vocab, 49,152 tokens): 135m = the demo model itself (SmolLM2-135M);
1.2b = hidden 2048, 16 layers, MLP 8192, 32 heads / 8 kv heads (1.17B); 3b = hidden 3072, 28
layers, MLP 8192, 24 heads / 8 kv heads (Llama-3.2-3B's body, 3.0B). The 3B model is 6 GB on disk:
delete --root when done (``--clean`` removes each built model after its row).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "models" / "base" / "smollm2-135m-instruct"
DEMO_DATA = REPO / "edgetune" / "resources" / "demo" / "support_tickets.jsonl"
PEAKMEM = REPO.parent / "shared" / "tools" / "peakmem"
EDGETUNE = [sys.executable, "-m", "edgetune"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "special_tokens_map.json")

# name -> LlamaConfig fields (None: the demo model folder as is)
SHAPES: dict[str, dict | None] = {
    "135m": None,
    "1.2b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=64),
    "3b": dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=8192, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128),
}


def build(shape: str, root: Path) -> Path:
    """The model folder of ``shape`` (built once, random weights in bf16, the demo tokenizer)."""
    if SHAPES[shape] is None:
        return DEMO_MODEL
    out = root / f"llama-{shape}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    demo = json.loads((DEMO_MODEL / "config.json").read_text())
    cfg = LlamaConfig(vocab_size=demo["vocab_size"], max_position_embeddings=8192, tie_word_embeddings=False,
                      bos_token_id=demo["bos_token_id"], eos_token_id=demo["eos_token_id"],
                      pad_token_id=demo.get("pad_token_id"), **SHAPES[shape])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in TOKENIZER_FILES:
        if (DEMO_MODEL / f).is_file():
            shutil.copy(DEMO_MODEL / f, tmp / f)
    del model
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def prepare(root: Path) -> Path:
    data = root / "data"
    if not (data / "train.jsonl").is_file():
        subprocess.run([*EDGETUNE, "data", "prepare", str(DEMO_DATA), "-o", str(data), "-m", str(DEMO_MODEL)],
                       check=True, stdout=subprocess.DEVNULL)
    return data


def train_args(model: Path, data: Path, a) -> list[str]:
    return ["train", "-m", str(model), "-d", str(data), "--iters", str(a.iters), "-b", str(a.batch),
            "--max-seq-len", str(a.seq), "--eval-every", "0", "--save-every", str(10 * a.iters),
            *(["--gradient-checkpointing"] if a.checkpointing else []), *a.extra]


def row(shape: str, a, root: Path, data: Path) -> dict:
    model = build(shape, root)
    dry = subprocess.run([*EDGETUNE, *train_args(model, data, a), "-o", str(root / "dry"), "--dry-run", "--json"],
                         check=True, capture_output=True, text=True)
    est = json.loads(dry.stdout)["memory"]
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        js = Path(tmp) / "peak.json"
        r = subprocess.run([sys.executable, str(PEAKMEM), "--json", str(js), *EDGETUNE,
                            *train_args(model, data, a), "-o", str(Path(tmp) / "run")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{shape}: training failed:\n{r.stderr[-3000:]}")
        peak = json.loads(js.read_text())
    if a.clean and SHAPES[shape] is not None:
        shutil.rmtree(model, ignore_errors=True)
    measured = peak["anon_gb"]
    return {"shape": shape, "params_b": est["params_b"], "precision": est["precision"],
            "estimated_gb": est["anon_gb"], "measured_anon_gb": round(measured, 3),
            "measured_file_gb": round(peak.get("file_gb", 0.0), 3),
            "error_pct": round(100 * (est["anon_gb"] - measured) / measured, 1), "wall_s": peak.get("wall_s"),
            "parts": {k: est.get(k) for k in ("weights_gb", "weights_mapped_gb", "runtime_gb", "adapter_gb",
                                            "optimizer_gb", "activations_gb")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="135m,1.2b,3b", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--root", default="/tmp/scale", help="where the random-weight models and the data go")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--checkpointing", action="store_true", help="train with --gradient-checkpointing")
    p.add_argument("--clean", action="store_true", help="delete each built model after its row")
    p.add_argument("--json", dest="json_out", default=None, help="also write the rows to this file")
    p.add_argument("extra", nargs="*", help="more `edgetune train` flags, after --")
    a = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    data = prepare(root)
    rows = []
    print(f"train {a.iters} steps, batch {a.batch} x {a.seq} tokens"
          + (", gradient checkpointing" if a.checkpointing else "") + "; peak anonymous memory (peakmem)")
    print(f"{'shape':6} {'params':>7} {'dtype':>5} {'estimated':>10} {'measured':>9} {'error':>7} {'wall':>7}")
    for shape in [s.strip() for s in a.shapes.split(",") if s.strip()]:
        r = row(shape, a, root, data)
        rows.append(r)
        print(f"{shape:6} {r['params_b']:>6.2f}B {r['precision']:>5} {r['estimated_gb']:>8.2f}GB "
              f"{r['measured_anon_gb']:>7.2f}GB {r['error_pct']:>+6.1f}% {r['wall_s']:>6.0f}s", flush=True)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
