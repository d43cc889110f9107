"""Is a golden set really held out? Its rows checked against a run's training split.

``data prepare`` keeps its own valid/test splits free of train duplicates; a user's own eval file
(``--data golden.jsonl``, ``eval.data``) gets the same check here: exact duplicates (same roles and
text after normalisation) and near duplicates (MinHash Jaccard at ``data.near_threshold``, on the
text without system turns) of any training row. An eval row seen in training measures memory, not
skill, so the overlap is reported and refused unless ``--allow-overlap`` (``eval.allow_overlap``).
"""

from __future__ import annotations

from pathlib import Path

from ..data import dedup as dd
from ..data.formats import Record, normalise
from ..data.load import iter_source, list_sources
from ..data.problems import Problem
from ..errors import EdgetuneError

SHOWN = 5  # overlapping rows named in the error / warning


def _records(path) -> list[Record]:
    out = []
    for src in list_sources(path):
        for item in iter_source(src):
            if item.problem is not None:
                continue
            try:
                rec = normalise(item.obj)
            except Problem:
                continue
            rec.source, rec.line = item.source, item.line
            out.append(rec)
    return out


def check(eval_path, train_path, threshold: float = 0.8) -> dict:
    """Rows of ``eval_path`` that duplicate (exactly or nearly) a row of ``train_path``."""
    ev, tr = _records(eval_path), _records(train_path)
    train_keys = {dd.exact_key(r.dedup_text()): r for r in tr}
    ev_keys = [dd.exact_key(r.dedup_text()) for r in ev]
    exact = [(r, train_keys[k]) for r, k in zip(ev, ev_keys, strict=True) if k in train_keys]
    rest = [i for i, k in enumerate(ev_keys) if k not in train_keys]
    near = []
    if rest and tr:
        sigs = dd.signatures([r.near_text() for r in tr] + [ev[i].near_text() for i in rest])
        hits = dd.cross_matches(sigs, threshold, list(range(len(tr))), [len(tr) + k for k in range(len(rest))])
        near = [(ev[rest[q - len(tr)]], tr[j]) for q, j in sorted(hits.items())]

    def row(pair):
        e, t = pair
        return {"eval": e.where, "train": t.where}

    return {"eval_data": str(eval_path), "train_data": str(train_path), "eval_rows": len(ev), "train_rows": len(tr),
            "near_threshold": threshold, "exact": len(exact), "near": len(near),
            "rows": [row(p) | {"kind": "exact"} for p in exact] + [row(p) | {"kind": "near"} for p in near]}


def describe(res: dict) -> str:
    shown = "; ".join(f"{r['eval']} ~ {r['train']} ({r['kind']})" for r in res["rows"][:SHOWN])
    more = f" and {len(res['rows']) - SHOWN} more" if len(res["rows"]) > SHOWN else ""
    return (f"{res['exact']} exact and {res['near']} near duplicate(s) of training rows among the {res['eval_rows']} "
            f"rows of {res['eval_data']}: {shown}{more}")


def guard(eval_path, train_path, *, threshold: float = 0.8, allow: bool = False) -> dict | None:
    """:func:`check`, refusing overlap unless ``allow`` (then it is returned for the report and warned)."""
    if not train_path or not Path(train_path).is_file():
        return None
    res = check(eval_path, train_path, threshold)
    if res["exact"] or res["near"]:
        if not allow:
            raise EdgetuneError(f"The eval data overlaps the training split: {describe(res)}.", where=str(eval_path),
                                fix="remove those rows from the eval file, or pass --allow-overlap (eval.allow_overlap: true) "
                                    "to evaluate anyway with the overlap in the report")
        from ..console import console

        console.print(f"[yellow]warning:[/] {describe(res)} (allowed: reported in the eval report)", highlight=False)
    return res
