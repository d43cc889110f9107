"""Load test for the team server (`edgetune serve --lora …`): one-at-a-time vs continuous batching, side by side.

    python scripts/bench_serve.py                       # demo GGUF + 3 generated LoRA adapters
    python scripts/bench_serve.py --quant q4_k_m        # the demo model as edgetune ships it (Q4_K_M)
    python scripts/bench_serve.py --ceiling q4_1,q4_0,q8_0,q4_k_m,f16   # llama.cpp alone, per quant type
    python scripts/bench_serve.py --base B.gguf --lora a=A.gguf --lora b=B.gguf --seconds 20 --out bench.json

On 127.0.0.1 only, bounded in time. In order:
1. the reference: each model id's greedy answer to each prompt from llama.cpp directly
   (``Llama(lora_path=…)``, one model per adapter);
2. RSS of a server with 1 adapter vs one with all adapters (each warmed: every model answered once);
3. what llama.cpp alone gains from batching on this machine (ms per decode step for 1, 4, 8 sequences);
4. for each mode (``--parallel 1``: one request at a time; ``--parallel N``: continuous batching; also
   ``batched_no_prefix_cache`` on request) and each traffic mix (every request on the base; each request on a random one
   of the 4 ids), 1, 4 and 8
   clients for ``--seconds`` each, every request streamed at temperature 0: throughput, tokens/s, p50/p95
   latency, p50/p95 time to first token; each answer classed as identical to its reference, *wrong
   model* (closer to another model id's reference than to its own: an adapter mix-up) or *drifted*
   (its own model's answer until a late near-tie went another way: batched arithmetic sums in another order);
5. beyond capacity (batching mode): ``--overload-factor`` x (parallel + queue depth) clients: the 503 share
   and how fast a 503 comes.
Exit status 1 when a wrong-model answer, a 5xx other than 503, a connection error or a 503 of 100 ms
or more happened, or a server died.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

PROMPTS = ["What is the capital of France?", "Name a colour.", "Write one word about the sea."]
KEY = "sk-bench"


def make_loras(base: Path, out: Path, n: int) -> dict[str, Path]:
    """``n`` real GGUF LoRA adapters for ``base`` (random attn_q deltas on the first layers, big
    enough to change greedy answers), so a wrong-adapter answer is detectable."""
    import numpy as np
    from gguf import GGUFReader, GGUFWriter

    r = GGUFReader(str(base))
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    hidden = int(r.fields[f"{arch}.embedding_length"].parts[-1][0])
    q = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    q_out = int(q.shape[1]) if len(q.shape) > 1 else hidden
    res = {}
    for i in range(n):
        rng = np.random.default_rng(i + 1)
        path = out / f"lora{i}.gguf"
        w = GGUFWriter(str(path), arch)
        w.add_string("general.type", "adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", 8.0)
        for layer in range(4):
            w.add_tensor(f"blk.{layer}.attn_q.weight.lora_a", (rng.standard_normal((4, hidden)) * 0.5).astype(np.float32))
            w.add_tensor(f"blk.{layer}.attn_q.weight.lora_b", (rng.standard_normal((q_out, 4)) * 0.5).astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        res[f"lora{i}"] = path
    return res


def demo_gguf(qtype: str, out: Path) -> Path:
    """The demo base model (``edgetune models fetch-demo``) as a ``qtype`` GGUF, made by edgetune."""
    from edgetune.export.gguf import convert
    from edgetune.paths import demo_model_dir
    from edgetune.quant.quantize import quantize

    f16 = out / "SmolLM2-135M-Instruct.F16.gguf"
    if not f16.exists():
        convert(demo_model_dir(), f16, "f16", verify=False, show_progress=False)
    if qtype.lower() == "f16":
        return f16
    return quantize(f16, out / f"SmolLM2-135M-Instruct.{qtype.upper()}.gguf", qtype)


def references(base: Path, loras: dict[str, Path], max_tokens: int, threads: int,
               flash_attn: bool = False) -> dict[tuple[str, str], str]:
    from llama_cpp import Llama

    ref = {}
    for mid, lp in [(base.stem, None), *loras.items()]:
        llm = Llama(model_path=str(base), lora_path=str(lp) if lp else None, n_ctx=512, n_threads=threads,
                    n_threads_batch=threads, flash_attn=flash_attn, chat_format="chat_template.default", verbose=False)
        for p in PROMPTS:
            r = llm.create_chat_completion([{"role": "user", "content": p}], max_tokens=max_tokens, temperature=0)
            ref[(mid, p)] = r["choices"][0]["message"]["content"]
        llm.close()
    return ref


def post(url: str, body: dict, timeout: float) -> tuple[int, dict, float]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = json.loads(r.read())
            return r.status, out, time.perf_counter() - t0
    except urllib.error.HTTPError as e:
        e.read()
        return e.code, {"retry_after": e.headers.get("Retry-After")}, time.perf_counter() - t0


class Server:
    def __init__(self, base: Path, loras: dict[str, Path], args, port: int, parallel: int, extra: tuple[str, ...] = ()):
        cmd = [sys.executable, "-m", "edgetune", "serve", str(base), "--port", str(port), "--api-key", KEY,
               "--threads", str(args.threads), "--queue-depth", str(args.queue_depth), "--queue-timeout", str(args.queue_timeout),
               "--n-ctx", "512", "--parallel", str(parallel), "--flash-attn" if args.flash_attn else "--no-flash-attn", *extra]
        for k, v in loras.items():
            cmd += ["--lora", f"{k}={v}"]
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(urllib.request.Request(self.url + "/health", headers={"Authorization": f"Bearer {KEY}"}), timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None:
                    self.log.seek(0)
                    raise SystemExit("server died at start:\n" + self.log.read().decode()[-3000:]) from None
                time.sleep(0.2)
        raise SystemExit("server did not start in 120 s")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stream(url: str, body: dict, timeout: float) -> tuple[int, str, float | None, float, int]:
    """(status, answer text, seconds to the first token, seconds in all, completion tokens) of one streamed chat."""
    data = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    t0 = time.perf_counter()
    first, pieces, tokens = None, [], 0
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    return int(ev["error"].get("code") or 500), "", first, time.perf_counter() - t0, 0
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
                for ch in ev.get("choices") or []:
                    piece = (ch.get("delta") or {}).get("content")
                    if piece:
                        first = first if first is not None else time.perf_counter() - t0
                        pieces.append(piece)
            return r.status, "".join(pieces), first, time.perf_counter() - t0, tokens
    except urllib.error.HTTPError as e:
        e.read()
        return e.code, "", None, time.perf_counter() - t0, 0


def _common(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def classify(answer: str, mid: str, p: str, ref: dict, ids: list[str]) -> str:
    want = ref[(mid, p)]
    if answer == want:
        return "identical"
    own = _common(answer, want)
    if any(_common(answer, ref[(o, p)]) > own for o in ids if o != mid):
        return "wrong_model"
    return "drifted"


def phase(srv: Server, ids: list[str], ref: dict, clients: int, seconds: float, max_tokens: int) -> dict:
    stats = {"ok": [], "ttft": [], "busy": [], "identical": 0, "drifted": 0, "wrong_model": 0, "other_5xx": 0, "other": 0,
             "errors": 0, "tokens": 0}
    lock = threading.Lock()
    stop_at = time.time() + seconds

    def client(seed: int):
        rng = random.Random(seed)
        while time.time() < stop_at:
            mid, p = rng.choice(ids), rng.choice(PROMPTS)
            body = {"model": mid, "messages": [{"role": "user", "content": p}], "max_tokens": max_tokens, "temperature": 0}
            try:
                status, text, ttft, dt, tokens = stream(srv.url + "/v1/chat/completions", body, timeout=seconds + 120)
            except OSError:
                with lock:
                    stats["errors"] += 1
                continue
            with lock:
                if status == 200:
                    stats["ok"].append(dt)
                    if ttft is not None:
                        stats["ttft"].append(ttft)
                    stats["tokens"] += tokens
                    stats[classify(text, mid, p, ref, ids)] += 1
                elif status == 503:
                    stats["busy"].append(dt)
                elif status >= 500:
                    stats["other_5xx"] += 1
                else:
                    stats["other"] += 1
            if status == 503:
                time.sleep(0.05)  # a real client would honour Retry-After; keep the pressure on

    t0 = time.time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    n = len(stats["ok"]) + len(stats["busy"]) + stats["other_5xx"] + stats["other"] + stats["errors"]
    ms = lambda x: None if x is None else round(1000 * x, 1)  # noqa: E731
    return {"clients": clients, "seconds": round(wall, 1), "requests": n, "ok": len(stats["ok"]),
            "throughput_rps": round(len(stats["ok"]) / wall, 2), "tokens_per_s": round(stats["tokens"] / wall, 1),
            "p50_ms": ms(pct(stats["ok"], 50)), "p95_ms": ms(pct(stats["ok"], 95)),
            "ttft_p50_ms": ms(pct(stats["ttft"], 50)), "ttft_p95_ms": ms(pct(stats["ttft"], 95)),
            "share_503": round(len(stats["busy"]) / n, 3) if n else None, "n_503": len(stats["busy"]),
            "503_p50_ms": ms(pct(stats["busy"], 50)), "503_max_ms": ms(max(stats["busy"], default=None)),
            "identical": stats["identical"], "drifted": stats["drifted"], "wrong_model": stats["wrong_model"],
            "other_5xx": stats["other_5xx"], "other_status": stats["other"],
            "connection_errors": stats["errors"], "server_alive": srv.alive()}


def kernel_ceiling(base: Path, threads: int, steps: int = 40, flash_attn: bool = False) -> dict:
    """What llama.cpp itself gains from batching on this machine, no server: ms per decode step for
    1, 4 and 8 sequences (one token each) in one context, and the tokens/s ratio to 1 sequence."""
    import llama_cpp
    from llama_cpp import Llama, _internals

    # n_threads_batch too: llama.cpp runs any step of more than one token on it, and Llama's default is
    # every core, which would compare 8 sequences on all cores with 1 sequence on ``threads``
    llm = Llama(model_path=str(base), n_ctx=256, n_threads=threads, n_threads_batch=threads, flash_attn=flash_attn,
                verbose=False)
    p = type(llm.context_params).from_buffer_copy(llm.context_params)
    p.n_ctx, p.n_seq_max, p.kv_unified = 2048, 8, True  # the thread counts come with the copy
    ctx = _internals.LlamaContext(model=llm._model, params=p, verbose=False)
    b = llama_cpp.llama_batch_init(64, 0, 1)
    out, pos = {}, [0] * 8
    for n in (1, 4, 8):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx.ctx), True)
        pos = [0] * 8
        t0 = 0.0
        for i in range(steps + 5):
            if i == 5:
                t0 = time.perf_counter()
            b.n_tokens = n
            for k in range(n):
                b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = 198, pos[k], 1, True
                b.seq_id[k][0] = k
                pos[k] += 1
            llama_cpp.llama_decode(ctx.ctx, b)
        out[n] = (time.perf_counter() - t0) / steps * 1000
    llama_cpp.llama_batch_free(b)
    ctx.close()
    llm.close()
    return {"ms_per_step": {str(n): round(v, 2) for n, v in out.items()},
            "tokens_per_s_vs_1": {str(n): round(n * out[1] / v, 2) for n, v in out.items()}}


def warm(srv: Server, ids: list[str]) -> None:
    for mid in ids:
        post(srv.url + "/v1/chat/completions", {"model": mid, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}, 300)


def ceiling_table(args, tmp: Path) -> int:
    """``--ceiling``: llama.cpp's batching gain per quant type and attention kernel, no server."""
    res: dict = {"cpu": _cpu(), "threads": args.threads, "load_average_before": os.getloadavg()[0], "types": {}}
    for qtype in args.ceiling.split(","):
        gguf = demo_gguf(qtype, tmp)
        res["types"][qtype] = {fa: kernel_ceiling(gguf, args.threads, flash_attn=fa == "flash_attn")
                               for fa in ("default", "flash_attn")}
        row = res["types"][qtype]
        print(f"{qtype:8s} 1 seq {row['default']['ms_per_step']['1']:6.1f} ms, 8 seqs {row['default']['ms_per_step']['8']:6.1f} ms: "
              f"{row['default']['tokens_per_s_vs_1']['8']:.2f}x;  flash attention: {row['flash_attn']['ms_per_step']['1']:6.1f} / "
              f"{row['flash_attn']['ms_per_step']['8']:6.1f} ms: {row['flash_attn']['tokens_per_s_vs_1']['8']:.2f}x", flush=True)
    res["load_average_after"] = os.getloadavg()[0]
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, default=None, help="Base GGUF (default: the demo SmolLM2-135M Q4_1 GGUF).")
    ap.add_argument("--quant", default=None, metavar="TYPE",
                    help="Instead of --base: the demo model converted by edgetune and quantized to TYPE (e.g. q4_k_m, "
                         "the type edgetune ships by default); llama.cpp batches some types far better than others.")
    ap.add_argument("--ceiling", default=None, metavar="TYPES",
                    help="Only measure llama.cpp's own batching gain (no server) for the demo model in each of these "
                         "comma-separated types, without and with flash attention, e.g. q4_1,q4_0,q8_0,q4_k_m,f16.")
    ap.add_argument("--flash-attn", action="store_true",
                    help="Both modes (and the references) with flash attention; without it both run without (the "
                         "server's own default turns it on only for batching bases, which would compare two kernels).")
    ap.add_argument("--lora", action="append", default=[], metavar="NAME=FILE", help="Adapter (default: 3 generated).")
    ap.add_argument("--seconds", type=float, default=15, help="Length of each load phase.")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--parallel", type=int, default=8, help="The batching mode's --parallel.")
    ap.add_argument("--clients", default="1,4,8", help="Client counts to measure.")
    ap.add_argument("--modes", default="serialized,batched",
                    help="Modes to measure: serialized (--parallel 1), batched, batched_no_prefix_cache.")
    ap.add_argument("--mixes", default="one_model,all_models", help="Traffic mixes: one_model (the base), all_models.")
    ap.add_argument("--queue-depth", type=int, default=16)
    ap.add_argument("--queue-timeout", type=float, default=60)
    ap.add_argument("--overload-factor", type=int, default=3, help="Clients beyond capacity = factor x (parallel + depth).")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="llama.cpp threads (default: all cores but one, left to the HTTP loop and the clients).")
    ap.add_argument("--port", type=int, default=18431)
    ap.add_argument("--out", type=Path, default=None, help="Write the figures as JSON here.")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    if args.ceiling:
        return ceiling_table(args, tmp)
    if args.base is None and args.quant:
        args.base = demo_gguf(args.quant, tmp)
    elif args.base is None:
        from edgetune.demo_model import locate_gguf

        args.base = locate_gguf(download=False)
    loras = {k: Path(v) for k, v in (x.split("=", 1) for x in args.lora)} or make_loras(args.base, tmp, 3)
    ids = [args.base.stem, *loras]
    print(f"reference answers from llama.cpp for {ids} …", flush=True)
    ref = references(args.base, loras, args.max_tokens, args.threads, args.flash_attn)
    distinct = len({tuple(ref[(m, p)] for p in PROMPTS) for m in ids})
    print(f"  {distinct} distinct answer sets for {len(ids)} models", flush=True)

    res: dict = {"base": str(args.base), "models": ids, "max_tokens": args.max_tokens, "queue_depth": args.queue_depth,
                 "parallel": args.parallel, "threads": args.threads, "flash_attn": args.flash_attn,
                 "distinct_reference_sets": distinct, "cpu": _cpu(),
                 "load_average_before": os.getloadavg()[0]}
    res["llama_cpp_batching_ceiling"] = kernel_ceiling(args.base, args.threads, flash_attn=args.flash_attn)
    print(f"llama.cpp alone, tokens/s vs 1 sequence: {res['llama_cpp_batching_ceiling']['tokens_per_s_vs_1']}", flush=True)
    first = dict(list(loras.items())[:1])
    srv = Server(args.base, first, args, args.port, args.parallel)
    try:
        warm(srv, [args.base.stem, *first])
        res["rss_mb_1_adapter"] = round(srv.rss_mb(), 1)
    finally:
        srv.stop()
    clients = [int(x) for x in args.clients.split(",")]
    mixes = {k: v for k, v in {"one_model": [ids[0]], "all_models": ids}.items() if k in args.mixes.split(",")}
    modes = {"serialized": (1, ()), "batched": (args.parallel, ()), "batched_no_prefix_cache": (args.parallel, ("--no-prefix-cache",))}
    modes = {k: v for k, v in modes.items() if k in args.modes.split(",")}
    for mode, (parallel, extra) in modes.items():
        srv = Server(args.base, loras, args, args.port, parallel, extra)
        try:
            warm(srv, ids)
            res[f"rss_mb_{len(loras)}_adapters_{mode}"] = round(srv.rss_mb(), 1)
            for mix, mids in mixes.items():
                for n in clients:
                    print(f"{mode} (parallel {parallel}), {mix}: {n} clients x {args.seconds:g} s …", flush=True)
                    r = phase(srv, mids, ref, n, args.seconds, args.max_tokens)
                    res.setdefault(mode, {}).setdefault(mix, {})[str(n)] = r
                    print(f"   {r['throughput_rps']} req/s, {r['tokens_per_s']} tok/s, p95 {r['p95_ms']} ms, "
                          f"ttft p50 {r['ttft_p50_ms']} ms, identical {r['identical']}/{r['ok']}, wrong {r['wrong_model']}",
                          flush=True)
            if mode == "batched" and "overload" not in res:
                over = args.overload_factor * (parallel + args.queue_depth)
                print(f"beyond capacity: {over} clients x {args.seconds:g} s …", flush=True)
                res["overload"] = phase(srv, ids, ref, over, args.seconds, args.max_tokens)
            res[f"server_alive_at_end_{mode}"] = srv.alive()
        finally:
            srv.stop()
    res["speedup"] = {m: {mix: {n: round(res[m][mix][n]["throughput_rps"] / res["serialized"][mix][n]["throughput_rps"], 2)
                                for n in res[m][mix]} for mix in mixes}
                      for m in modes if m != "serialized" and "serialized" in modes}
    res["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(res, indent=2))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    phases = [r for mode in modes for mix in res[mode].values() for r in mix.values()] + [res[k] for k in ("overload",) if k in res]
    bad = [k for r in phases for k in ("wrong_model", "other_5xx", "connection_errors") if r[k]]
    slow503 = (res.get("overload", {}).get("503_max_ms") or 0) >= 100
    alive = all(res[f"server_alive_at_end_{m}"] for m in modes)
    if bad or slow503 or not alive:
        print(f"FAILED: {bad or ''} {'503 took >= 100 ms' if slow503 else ''}", file=sys.stderr)
        return 1
    return 0


def _cpu() -> str:
    from edgetune.hardware import cpu_model_and_flags

    return f"{cpu_model_and_flags()[0] or 'unknown'}, {os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
