"""``--quant auto``: quantize a ladder of types, measure each against the unquantized export, ship
the smallest that passes the quality gate.

The measurement is the one the rest of edgetune reports (export/verify.py ``drift``: mean KL of
the quantized next-token distribution from the f16 one, and top-1 agreement, over every position
of held-out prompts, both sides run by llama.cpp), plus llama.cpp's prompt throughput and the file's
real bits per weight. The default gate (export.max_kl, export.min_top1 in config.py) is llama.cpp's
published Q4_K_M figure; the table, a size-vs-KL plot and the reason for the choice go beside the
GGUF files as quant-auto.md / .json / .png.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import EdgetuneError
from ..io import atomic_path, write_json, write_text
from ..qtypes import LADDER, QTYPES, normalize_qtype

N_CTX = 512  # each held-out text is cut to this many tokens
MAX_TEXTS = 32  # held-out texts measured (enough positions for a stable mean KL, seconds per type)
REPORT = "quant-auto"  # file stem of the table and plot


@dataclass
class LadderRow:
    qtype: str
    size_mb: float
    bpw: float  # file bits per weight (all tensors, incl. embeddings)
    mean_kl: float
    top1: float
    tok_s: float  # llama.cpp greedy generation, tokens/s (after the prompt)
    imatrix: bool
    passed: bool = False
    chosen: bool = False


def heldout_token_lists(llm, texts: list[str] | None) -> list[list[int]]:
    """Tokens of the held-out texts as llama.cpp reads them (BOS per the GGUF, special tokens
    parsed); without texts, the fixed verification corpus of export/verify.py."""
    from ..export.verify import PROMPTS

    texts = texts or list(PROMPTS)
    lists = [llm.tokenize(t.encode("utf-8"), add_bos=True, special=True)[:N_CTX] for t in texts[:MAX_TEXTS]]
    return [x for x in lists if len(x) > 1]


def generation_speed(llm, prompt: list[int], n: int = 16) -> float:
    """Greedy tokens/s after the first token (the prompt's processing excluded)."""
    t0, k = None, 0
    for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if t0 is None:
            t0 = time.perf_counter()
        else:
            k += 1
        if k >= n:
            break
    return round(k / max(time.perf_counter() - t0, 1e-9), 1) if t0 and k else 0.0


def measure(ref_gguf, files: dict[str, Path], token_lists: list[list[int]], imatrix_used: dict[str, bool]) -> list[LadderRow]:
    """One row per quantized file: size, bits/weight, drift vs ``ref_gguf``, llama.cpp tokens/s."""
    from ..eval.divergence import combine, drift
    from ..export.gguf_info import read_tensor_infos
    from ..llamacpp import gguf_logits, load_llama

    n_params = sum(t.n_elements for t in read_tensor_infos(ref_gguf))
    llm = load_llama(ref_gguf, n_ctx=N_CTX)
    try:
        ref = gguf_logits(llm, token_lists)
    finally:
        llm.close()
    rows = []
    for q, path in files.items():
        llm = load_llama(path, n_ctx=N_CTX)
        try:
            test = gguf_logits(llm, token_lists)
            speed = generation_speed(llm, token_lists[0])
        finally:
            llm.close()
        d = combine([drift(r, t, q) for r, t in zip(ref, test, strict=True)], q)
        size = Path(path).stat().st_size
        rows.append(LadderRow(q, round(size / 2**20, 2), round(size * 8 / n_params, 3), d.mean_kl, d.top1,
                              speed, imatrix_used.get(q, False)))
    return rows


def choose(rows: list[LadderRow], max_kl: float, min_top1: float) -> LadderRow | None:
    """The smallest file whose mean KL <= max_kl and top-1 >= min_top1 (marks passed/chosen)."""
    for r in rows:
        r.passed = r.mean_kl <= max_kl and r.top1 >= min_top1
    ok = [r for r in rows if r.passed]
    best = min(ok, key=lambda r: r.size_mb) if ok else None
    if best:
        best.chosen = True
    return best


def reason(best: LadderRow | None, rows: list[LadderRow], max_kl: float, min_top1: float) -> str:
    gate = f"mean KL <= {max_kl:g} and top-1 >= {min_top1:.0%}"
    if best is None:
        return f"no type passed the gate ({gate})"
    smaller = [r for r in rows if r.size_mb < best.size_mb]
    why = "; ".join(f"{r.qtype}: KL {r.mean_kl:.4f}, top-1 {r.top1:.1%}" for r in sorted(smaller, key=lambda r: -r.size_mb))
    return (f"{best.qtype} is the smallest file that passes the gate ({gate}): KL {best.mean_kl:.4f}, "
            f"top-1 {best.top1:.1%}, {best.size_mb:.1f} MiB" + (f". Smaller types failed ({why})" if smaller else ""))


def markdown(rows: list[LadderRow], ref_name: str, why: str, positions: int) -> str:
    lines = [f"# Quant selection vs {ref_name}", "",
             f"{positions} held-out token positions; KL = mean KL(f16 || quant) per position, nats; "
             "tokens/s = llama.cpp greedy generation after the prompt.", "",
             "| type | size MiB | bits/weight | mean KL | top-1 | tokens/s | imatrix | gate |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        gate = "**chosen**" if r.chosen else ("pass" if r.passed else "fail")
        lines.append(f"| {r.qtype} | {r.size_mb:.1f} | {r.bpw:.2f} | {r.mean_kl:.4f} | {r.top1:.1%} | {r.tok_s:.0f} | "
                     f"{'yes' if r.imatrix else 'no'} | {gate} |")
    return "\n".join(lines + ["", why, ""])


def plot(rows: list[LadderRow], max_kl: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for r in rows:
        ax.scatter(r.size_mb, max(r.mean_kl, 1e-6), s=60 if r.chosen else 30,
                   c="tab:green" if r.chosen else ("tab:blue" if r.passed else "tab:red"), zorder=3)
        ax.annotate(r.qtype, (r.size_mb, max(r.mean_kl, 1e-6)), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(max_kl, color="gray", ls="--", lw=1, label=f"gate: mean KL {max_kl:g}")
    ax.set_yscale("log")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("mean KL vs f16 (nats, log)")
    ax.set_title("size vs KL (green: chosen, blue: pass, red: fail)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def auto_quantize(base_gguf, out_dir, name: str, *, imatrix=None, ladder: list[str] | None = None,
                  max_kl: float = 0.03, min_top1: float = 0.90, heldout: list[str] | None = None) -> dict:
    """Quantize ``ladder`` from ``base_gguf``, measure, keep the smallest that passes as
    ``out_dir/<name>-<type>.gguf`` (the others are deleted), write quant-auto.md/.json/.png.

    Returns ``{"chosen", "file", "rows", "reason", "report", "positions"}``; raises when no type passes (the
    table is written first, so the user sees how far each type was)."""
    from ..console import console
    from ..llamacpp import load_llama
    from .quantize import quantize

    out_dir = Path(out_dir)
    types = [normalize_qtype(q) for q in (ladder or LADDER)]
    skipped = [q for q in types if QTYPES[q].needs_imatrix and imatrix is None]
    types = [q for q in types if q not in skipped]
    if not types:
        raise EdgetuneError("The auto ladder has no type that can be quantized without an importance matrix.",
                            fix="add calibration data (export.calib / --calib) or types such as q4_k_m to export.ladder")
    work = out_dir / f".{name}-ladder"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        files, used = {}, {}
        for q in types:
            console.print(f"[dim]quantizing {q}…[/]")
            used[q] = imatrix is not None and QTYPES[q].imatrix
            files[q] = quantize(base_gguf, work / f"{name}-{q}.gguf", q, imatrix=imatrix if used[q] else None)
        llm = load_llama(base_gguf, n_ctx=N_CTX, logits_all=False)
        try:
            lists = heldout_token_lists(llm, heldout)
        finally:
            llm.close()
        rows = measure(base_gguf, files, lists, used)
        rows.sort(key=lambda r: -r.size_mb)
        best = choose(rows, max_kl, min_top1)
        why = reason(best, rows, max_kl, min_top1)
        if skipped:
            why += f". Not tried without an importance matrix: {', '.join(skipped)}"
        positions = sum(len(x) for x in lists)
        md = write_text(out_dir / f"{REPORT}.md", markdown(rows, Path(base_gguf).name, why, positions))
        png = plot(rows, max_kl, out_dir / f"{REPORT}.png")
        final = out_dir / f"{name}-{best.qtype}.gguf" if best else None
        record = {"chosen": best.qtype if best else None, "file": str(final) if final else None, "reason": why,
                  "gate": {"max_kl": max_kl, "min_top1": min_top1}, "reference": str(base_gguf),
                  "heldout": "held-out split" if heldout else "verification corpus (export/verify.py)",
                  "positions": positions, "rows": [asdict(r) for r in rows], "markdown": str(md), "plot": str(png)}
        write_json(out_dir / f"{REPORT}.json", record)
        if best is None:
            raise EdgetuneError(f"--quant auto: {why}.", where=str(md),
                                fix="relax export.max_kl / export.min_top1 (--max-kl, --min-top1) or export a type explicitly")
        files[best.qtype].replace(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"chosen": best.qtype, "file": final, "rows": rows, "reason": why, "report": md, "positions": positions}


def chosen_type(gguf_dir) -> str | None:
    """The type a previous ``--quant auto`` shipped into ``gguf_dir`` (None when it has not run)."""
    from ..io import read_json

    p = Path(gguf_dir) / f"{REPORT}.json"
    return read_json(p).get("chosen") if p.is_file() else None


