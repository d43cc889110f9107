#!/usr/bin/env python3
"""How each stage's cost grows with model size: peak memory (anonymous and file-backed) and wall
time of export + verification, the importance matrix, quantize + verification, --quant auto,
ollama check, eval drift and fuse, on random-weight Llama-shaped models of real sizes.

    python scripts/bench_scale.py                         # 135M, 1.2B, 3B shapes
    python scripts/bench_scale.py --sizes 1.2b --stages export,imatrix
    python scripts/bench_scale.py --sizes 8b --ladder q8_0,q4_k_m     # the 8B shape (14 GB of disk per copy)
    python scripts/bench_scale.py --llama-cpp-converter PATH/convert_hf_to_gguf.py   # llama.cpp's own, side by side
                                  # (e.g. vendor/llama.cpp/ of the llama-cpp-python sdist of the installed version)

Each stage is the CLI command a user runs, measured by ../shared/tools/peakmem (or --peakmem):
anonymous memory is what must fit in RAM; file-backed pages (mmapped safetensors / GGUF) are page
cache the kernel can drop. Models are written tensor by tensor as random bf16 (never whole in
memory) with the demo model's tokenizer, so no hub is touched; they are kept under --work and
reused. Results go to WORK/bench_scale.json and a plot, WORK/bench_scale.png (memory per stage vs
parameters); --readme prints the README table. Run it with nothing else on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> Llama config fields. Blocks follow the released models named; every shape uses the demo
# tokenizer (SmolLM2, 49,152 tokens) so the vocabulary, and with it the embedding, is that size.
SHAPES = {
    "135m": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                 num_key_value_heads=3, tie_word_embeddings=True),  # SmolLM2-135M
    "1.2b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                 num_key_value_heads=8, tie_word_embeddings=False),  # Llama-3.2-1B blocks (issue 24's 1.17B shape)
    "3b": dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=8192, num_attention_heads=24,
               num_key_value_heads=8, tie_word_embeddings=False),  # Llama-3.2-3B blocks
    "8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),  # Llama-3.1-8B blocks
}
STAGES = ["convert", "export", "imatrix", "quantize", "auto", "ollama", "drift", "fuse"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "chat_template.jinja")


def edgetune(*args) -> list[str]:
    return [str(Path(sys.executable).with_name("edgetune")), *args]


def write_random_model(out: Path, shape: dict, demo: Path, seed: int = 0) -> int:
    """A random-weight bf16 LlamaForCausalLM folder written one tensor at a time; returns parameters."""
    from edgetune.tensors import SafetensorsWriter, f32_to_bf16_bits

    if (out / "config.json").is_file():
        return json.loads((out / "edgetune-bench.json").read_text())["params"]
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok_cfg = json.loads((demo / "config.json").read_text())
    h, L, inter = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    hd = h // heads
    vocab = tok_cfg["vocab_size"]
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "max_position_embeddings": 8192, "vocab_size": vocab, "head_dim": hd,
           "bos_token_id": tok_cfg.get("bos_token_id"), "eos_token_id": tok_cfg.get("eos_token_id"),
           "pad_token_id": tok_cfg.get("pad_token_id"), "dtype": "bfloat16", "attention_bias": False,
           "mlp_bias": False, **shape}
    plan = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(L):
        p = f"model.layers.{i}."
        plan += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                 (p + "self_attn.q_proj.weight", (heads * hd, h)), (p + "self_attn.k_proj.weight", (kv * hd, h)),
                 (p + "self_attn.v_proj.weight", (kv * hd, h)), (p + "self_attn.o_proj.weight", (h, heads * hd)),
                 (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                 (p + "mlp.down_proj.weight", (h, inter))]
    plan.append(("model.norm.weight", (h,)))
    if not shape["tie_word_embeddings"]:
        plan.append(("lm_head.weight", (vocab, h)))
    rng = np.random.default_rng(seed)
    n_params = 0
    with SafetensorsWriter(tmp / "model.safetensors", [(n, "BF16", s) for n, s in plan]) as w:
        for name, s in plan:
            n = int(np.prod(s))
            n_params += n
            if len(s) == 1:
                w.write(name, f32_to_bf16_bits(np.ones(s, dtype=np.float32)))
                continue
            arr = np.empty(s, dtype=np.uint16)
            step = max(1, (1 << 24) // s[1])  # 16M values at a time
            for a in range(0, s[0], step):
                arr[a : a + step] = f32_to_bf16_bits(rng.standard_normal((min(step, s[0] - a), s[1]), dtype=np.float32) * 0.02)
            w.write(name, arr)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in TOKENIZER_FILES:
        if (demo / f).is_file():
            shutil.copy(demo / f, tmp / f)
    if (demo / "generation_config.json").is_file():
        shutil.copy(demo / "generation_config.json", tmp / "generation_config.json")
    (tmp / "edgetune-bench.json").write_text(json.dumps({"params": n_params, "shape": shape}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return n_params


def write_random_adapter(out: Path, model_dir: Path, shape: dict, rank: int = 16) -> Path:
    """A PEFT LoRA adapter with random A and B on every attention and MLP projection."""
    from edgetune.tensors import SafetensorsWriter

    if (out / "adapter_config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    h, inter, heads, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
    hd = h // heads
    dims = {"self_attn.q_proj": (h, heads * hd), "self_attn.k_proj": (h, kv * hd), "self_attn.v_proj": (h, kv * hd),
            "self_attn.o_proj": (heads * hd, h), "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter), "mlp.down_proj": (inter, h)}
    plan = []
    for i in range(shape["num_hidden_layers"]):
        for mod, (din, dout) in dims.items():
            p = f"base_model.model.model.layers.{i}.{mod}"
            plan += [(p + ".lora_A.weight", (rank, din)), (p + ".lora_B.weight", (dout, rank))]
    rng = np.random.default_rng(1)
    with SafetensorsWriter(out / "adapter_model.safetensors", [(n, "F32", s) for n, s in plan]) as w:
        for n, s in plan:
            w.write(n, rng.standard_normal(s, dtype=np.float32) * 0.01)
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "base_model_name_or_path": str(model_dir),
        "target_modules": sorted({m.split(".")[-1] for m in dims}), "task_type": "CAUSAL_LM"}))
    return out


def measure(cmd: list[str], peakmem: str, log: Path) -> dict:
    js = log.with_suffix(".peak.json")
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.call([sys.executable, peakmem, "--json", str(js), *cmd], stdout=fh, stderr=subprocess.STDOUT,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    res = json.loads(js.read_text()) if js.is_file() else {"rc": rc, "wall_s": time.time() - t0}
    res["cmd"] = " ".join(cmd)
    if rc != 0:
        res["error"] = log.read_text()[-1500:]
    return res


def bench_size(size: str, args, demo: Path, peakmem: str) -> dict:
    shape = SHAPES[size]
    w = Path(args.work) / size
    w.mkdir(parents=True, exist_ok=True)
    model = w / "model"
    t0 = time.time()
    params = write_random_model(model, shape, demo)
    print(f"[{size}] model: {params / 1e9:.2f}B parameters, {params * 2 / 1e9:.2f} GB bf16 ({time.time() - t0:.0f} s)", flush=True)
    calib = ROOT / "edgetune" / "resources" / "demo" / "support_tickets.jsonl"
    g = w / "gguf"
    g.mkdir(exist_ok=True)
    f16, q4, im = g / "m-f16.gguf", g / "m-q4_k_m.gguf", g / "imatrix.gguf"
    cmds = {
        "convert": edgetune("export", "gguf", str(model), "-o", str(g / "noverify-f16.gguf"), "--type", "f16", "--no-verify"),
        "export": edgetune("export", "gguf", str(model), "-o", str(f16), "--type", "f16"),
        "imatrix": edgetune("export", "imatrix", str(model), "--calib", str(calib), "-o", str(im),
                            "--max-tokens", str(args.imatrix_tokens)),
        "quantize": edgetune("export", "quantize", str(f16), "-t", "q4_k_m", "--imatrix", str(im), "-o", str(q4)),
        # random weights have near-uniform logits, so no quant passes a real gate: measure, do not gate
        "auto": edgetune("export", str(model), "--quant", "auto", "--imatrix", str(im), "--ladder", args.ladder,
                         "--max-kl", "100", "--min-top1", "0",
                         "-o", str(w / "auto"), "--name", "m"),
        "ollama": None,  # two commands: write, then check
        "drift": edgetune("eval", "drift", "-r", f"hf:{model}", "-c", f"gguf:{q4}", "--data", str(calib),
                          "--limit", str(args.drift_examples), "-o", str(w / "drift.json")),
        "fuse": edgetune("fuse", "--base", str(model), "--adapter", str(write_random_adapter(w / "adapter", model, shape)),
                         "-o", str(w / "fused")),
    }
    out = {"size": size, "params": params, "bf16_gb": params * 2 / 1e9, "shape": shape, "stages": {}}
    for st in args.stages:
        if st == "ollama":
            od = w / "ollama"
            shutil.rmtree(od, ignore_errors=True)
            subprocess.run(edgetune("ollama", "write", str(q4), "--name", "m", "-o", str(od), "--model-dir", str(model)),
                           check=True, capture_output=True)
            cmd = edgetune("ollama", "check", str(od / "Modelfile"), "--model-dir", str(model))
        else:
            cmd = cmds[st]
        if st == "auto":
            shutil.rmtree(w / "auto", ignore_errors=True)
        if st == "fuse":
            shutil.rmtree(w / "fused", ignore_errors=True)
        r = measure(cmd, peakmem, w / f"{st}.log")
        r["anon_x_bf16"] = r.get("anon_gb", 0) / out["bf16_gb"]
        out["stages"][st] = r
        status = "ok" if r.get("rc") == 0 else f"FAILED rc={r.get('rc')} (see {w / (st + '.log')})"
        print(f"[{size}] {st:9s} anon {r.get('anon_gb', 0):6.2f} GB  file {r.get('file_gb', 0):6.2f} GB  "
              f"{r.get('wall_s', 0):7.1f} s  {status}", flush=True)
        if st == "auto":
            shutil.rmtree(w / "auto", ignore_errors=True)  # its f16 copy and the ladder: disk, not data
        if st == "convert":
            (g / "noverify-f16.gguf").unlink(missing_ok=True)
    if args.llama_cpp_converter:
        conv = Path(args.llama_cpp_converter)
        if conv.suffix == ".py":  # a llama.cpp checkout: its gguf-py and conversion/ beside the script
            os.environ["PYTHONPATH"] = os.pathsep.join([str(conv.parent / "gguf-py"), str(conv.parent)])
            cmd = [sys.executable, str(conv)]
        else:
            cmd = [str(conv)]
        cmd += [str(model), "--outfile", str(g / "llamacpp-f16.gguf"), "--outtype", "f16"]
        r = measure(cmd, peakmem, w / "llamacpp_convert.log")
        r["anon_x_bf16"] = r.get("anon_gb", 0) / out["bf16_gb"]
        out["stages"]["llama.cpp convert"] = r
        (g / "llamacpp-f16.gguf").unlink(missing_ok=True)
        print(f"[{size}] llama.cpp convert_hf_to_gguf.py f16: anon {r.get('anon_gb', 0):.2f} GB, {r.get('wall_s', 0):.1f} s", flush=True)
    if not args.keep:
        for p in (f16, q4, w / "fused"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [r["params"] / 1e9 for r in results]
    ax.plot(xs, [r["bf16_gb"] for r in results], "k--", label="model size (bf16)")
    ax.plot(xs, [2 * r["bf16_gb"] for r in results], "k:", label="whole model in fp32 (what verification,\nimatrix and drift held before)")
    stages = sorted({s for r in results for s in r["stages"]})
    for st in stages:
        pts = [(r["params"] / 1e9, r["stages"][st]["anon_gb"]) for r in results if r["stages"].get(st, {}).get("rc") == 0]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=st)
    ax.set_xlabel("parameters (billions)")
    ax.set_ylabel("peak anonymous memory (GB)")
    ax.set_title("edgetune: peak memory per stage vs model size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def readme_table(results: list[dict]) -> str:
    order = ["convert", "llama.cpp convert", *STAGES[1:]]
    stages = [s for s in order if any(s in r["stages"] for r in results)]
    head = "| stage | " + " | ".join(f"{r['size']} ({r['bf16_gb']:.2f} GB bf16)" for r in results) + " |"
    lines = [head, "|---|" + "---|" * len(results)]
    for st in stages:
        cells = []
        for r in results:
            m = r["stages"].get(st)
            if not m:
                cells.append("–")
            elif m.get("rc") != 0:
                cells.append("failed")
            else:
                cells.append(f"{m['anon_gb']:.2f} GB ({m['anon_x_bf16']:.2f}x), {m['wall_s']:.0f} s")
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="135m,1.2b,3b", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--work", default="/tmp/edgetune-scale")
    ap.add_argument("--peakmem", default=str(ROOT.parent / "shared" / "tools" / "peakmem"))
    ap.add_argument("--imatrix-tokens", type=int, default=1000)
    ap.add_argument("--drift-examples", type=int, default=8)
    ap.add_argument("--ladder", default="q8_0,q4_k_m", help="--quant auto ladder (the whole ladder is slow at 8B on 2 cores)")
    ap.add_argument("--llama-cpp-converter", default=None, help="path to llama.cpp's convert_hf_to_gguf.py, run side by side")
    ap.add_argument("--keep", action="store_true", help="keep GGUFs and fused models (disk)")
    ap.add_argument("--readme", action="store_true", help="print the README table")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot and table from WORK/bench_scale.json")
    args = ap.parse_args()
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in args.stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; use {STAGES}")
    from edgetune.paths import demo_model_dir

    demo = demo_model_dir()
    if not (demo / "tokenizer.json").is_file():
        ap.error(f"the demo model is not at {demo}: run `edgetune models fetch-demo` first")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    print(f"CPU: {cpu}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    path = Path(args.work) / "bench_scale.json"
    prev = json.loads(path.read_text()) if path.is_file() else {"results": []}
    if args.plot_only:
        plot(prev["results"], Path(args.work) / "bench_scale.png")
        print(readme_table(prev["results"]))
        return 0
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        res = bench_size(size, args, demo, args.peakmem)
        res["cpu"], res["load_avg_start"] = cpu, os.getloadavg()[0]
        results.append(res)
        old = next((r for r in prev["results"] if r["size"] == size), None)
        if old:  # stages of this size measured earlier and not now stay
            res = {**res, "stages": {**old["stages"], **res["stages"]}}
        kept = [r for r in prev["results"] if r["size"] != size]  # other sizes from earlier runs stay
        prev = {"results": sorted([*kept, res], key=lambda r: r["params"])}
        path.write_text(json.dumps(prev, indent=2))
    plot(prev["results"], Path(args.work) / "bench_scale.png")
    print(readme_table(prev["results"]) if args.readme else json.dumps(results, indent=1)[:4000])
    print(f"results: {path}; plot: {Path(args.work) / 'bench_scale.png'}")
    return 0 if all(s.get("rc") == 0 for r in results for s in r["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
