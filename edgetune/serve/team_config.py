"""The team server's config: bases, their LoRA adapters, routes and limits, from YAML or flags.

```yaml
# edgetune serve --config team.yaml
bases:
  smol:                          # a model id: the base without adapter
    path: smol-q8_0.gguf         # relative paths are relative to this file
    n_ctx: 2048                  # the longest request (prompt + answer), in tokens
    parallel: 8                  # requests decoded together in one batch (1: one at a time)
    prefix_cache: true           # reuse a shared prompt prefix's KV (false: every prompt computed in full)
    flash_attn: auto             # llama.cpp's flash attention: auto = on when parallel > 1 (faster batches)
    adapters:                    # each adapter is one more model id, on the same loaded base
      support: support.lora.gguf
      legal: {path: legal.lora.gguf, scale: 1.0}
routes:
  triage:                        # A/B: weights, sticky per request `user`
    split: {support: 90, legal: 10}
  triage-shadow:                 # shadow: answer from primary, mirror to candidate, log both
    primary: support
    shadow: legal
limits:
  queue_depth: 8                 # requests waiting per base (beyond the `parallel` running); more → 503
  queue_timeout: 30              # seconds a request may wait for its turn; longer → 503
  memory_cap_mb: 0               # loaded bases above this are unloaded least recently used first (0: no cap)
  release:                       # a gated canary: 10 % to the candidate, promoted or rolled back on outcomes
    canary: {stable: smol, candidate: support, share: 10, min_outcomes: 30, promote: {model: smol-support, alias: prod}}
log:
  shadow_log: shadow.jsonl       # JSONL record of shadow, A/B and canary traffic and canary decisions
  feedback_log: feedback.jsonl   # POST /v1/feedback records (default: beside shadow_log)
  log_text: false                # put prompts into that log and the server log (off: private deployments)
```
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgetuneError

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")


DEFAULT_PARALLEL = 8


@dataclass
class AdapterSpec:
    name: str
    path: Path
    scale: float = 1.0  # llama.cpp LoRA scale (1.0 = as trained)


@dataclass
class BaseSpec:
    name: str
    path: Path
    adapters: dict[str, AdapterSpec] = field(default_factory=dict)
    n_ctx: int = 2048  # the longest request (prompt + answer) in tokens
    n_threads: int | None = None
    parallel: int = DEFAULT_PARALLEL  # requests decoded together (continuous batching); 1 = one at a time
    prefix_cache: bool = True  # batching: reuse the KV of a prompt prefix an earlier request computed
    # llama.cpp's flash attention; None (auto): on for a batching base, where it makes steps of many
    # sequences cheaper (README, load test), off for ``parallel: 1``, the path whose answers repeat the
    # eval's llama.cpp runner's bit for bit (its kernel rounds queries to f16: near-ties can flip)
    flash_attn: bool | None = None

    source: str | None = None  # registry:NAME@ALIAS / NAME:vN: the registry entry whose GGUF ``path`` is
    version: str | None = None  # that entry's NAME:vN, as last resolved

    @property
    def use_flash_attn(self) -> bool:
        return self.parallel > 1 if self.flash_attn is None else self.flash_attn

    def refresh(self) -> bool:
        """Re-resolve a registry-backed base (an alias may have moved); True when its GGUF changed."""
        if not self.source:
            return False
        entry, path = resolve_source(self.source)
        changed = path != self.path
        self.path, self.version = path, entry.ref
        return changed

    @property
    def kv_cells(self) -> int:
        """KV cache size of a batching base: room for ``parallel`` requests of ``n_ctx`` (as Ollama sizes
        its context for OLLAMA_NUM_PARALLEL), shared by all of them and the prefix entries."""
        return self.n_ctx * max(1, self.parallel)


@dataclass
class RouteSpec:
    name: str
    split: dict[str, float] = field(default_factory=dict)  # model id → weight (A/B)
    primary: str | None = None  # shadow: who answers
    shadow: str | None = None  # shadow: who is mirrored
    canary: CanarySpec | None = None  # a gated canary: a share of traffic to a candidate, decided by outcomes


@dataclass
class CanarySpec:
    """``canary: {stable: ID, candidate: ID, share: 10, min_outcomes: 30, max_outcomes: 400, alpha: 0.05,
    margin: 0.05, promote: {model: NAME, alias: prod}}`` (see :mod:`edgetune.serve.canary`)."""

    stable: str
    candidate: str
    share: float = 10.0  # percent of the route's traffic to the candidate
    min_outcomes: int = 30  # per side, before any decision
    max_outcomes: int = 400  # per side: no significant result by then → rolled back (inconclusive)
    alpha: float = 0.05  # one-sided level of each test
    margin: float = 0.05  # promote when the candidate is not worse than stable by more than this
    promote_model: str | None = None  # registry model whose alias moves to the candidate's version on promotion
    promote_alias: str = "prod"


@dataclass
class TeamConfig:
    bases: dict[str, BaseSpec]
    routes: dict[str, RouteSpec] = field(default_factory=dict)
    queue_depth: int = 8
    queue_timeout: float = 30.0
    memory_cap_mb: float = 0.0
    shadow_log: Path | None = None
    log_text: bool = False
    feedback_log: Path | None = None  # POST /v1/feedback records (default: feedback.jsonl beside the shadow log)
    feedback_ttl_s: float = 86400.0  # how long a request id takes feedback

    def __post_init__(self):
        if not self.bases:
            raise EdgetuneError("The serve config names no base model.", fix="add a `bases:` entry with a GGUF path")
        if self.queue_depth < 0 or self.queue_timeout <= 0:
            raise EdgetuneError(f"limits: queue_depth must be >= 0 and queue_timeout > 0 (got {self.queue_depth}, "
                                f"{self.queue_timeout}).", fix="e.g. queue_depth: 8, queue_timeout: 30")
        seen: dict[str, str] = {}
        for b in self.bases.values():
            for mid in [b.name, *b.adapters]:
                _check_id(mid, seen, f"bases.{b.name}")
        for r in self.routes.values():
            _check_id(r.name, seen, f"routes.{r.name}")
            targets = list(r.split) + [t for t in (r.primary, r.shadow) if t]
            if r.canary is not None:
                c = r.canary
                targets += [c.stable, c.candidate]
                if r.split or r.primary:
                    raise EdgetuneError(f"Route {r.name!r}: a canary route has only `canary`.", where=f"routes.{r.name}")
                if c.stable == c.candidate or not 0 <= c.share <= 100 or not 0 < c.alpha < 0.5 or c.min_outcomes < 1 \
                        or c.max_outcomes < c.min_outcomes or not 0 <= c.margin < 1:
                    raise EdgetuneError(f"Route {r.name!r}: canary needs two different ids, share 0-100, 0 < alpha < 0.5, "
                                        "1 <= min_outcomes <= max_outcomes, 0 <= margin < 1.", where=f"routes.{r.name}.canary",
                                        fix="canary: {stable: prod, candidate: v3, share: 10}")
            elif bool(r.split) == bool(r.primary):
                raise EdgetuneError(f"Route {r.name!r} needs either `split` or `primary` (+ `shadow`), not both or neither.",
                                    where=f"routes.{r.name}", fix="split: {a: 90, b: 10}   or   primary: a, shadow: b")
            if r.primary and not r.shadow:
                raise EdgetuneError(f"Route {r.name!r} has a primary but no shadow.", where=f"routes.{r.name}",
                                    fix="add `shadow: CANDIDATE`, or use the model id directly")
            for t in targets:
                if t not in self.model_ids() or t in self.routes:
                    raise EdgetuneError(f"Route {r.name!r} sends traffic to {t!r}, which is not a base or adapter id.",
                                        where=f"routes.{r.name}", fix="known ids: " + ", ".join(self.model_ids()))
            if r.split and (any(w < 0 for w in r.split.values()) or sum(r.split.values()) <= 0):
                raise EdgetuneError(f"Route {r.name!r}: split weights must be >= 0 with a positive sum.", where=f"routes.{r.name}")

    def model_ids(self) -> list[str]:
        """Every servable id: bases, then their adapters."""
        return [mid for b in self.bases.values() for mid in [b.name, *b.adapters]]

    def locate(self, model_id: str) -> tuple[BaseSpec, str | None]:
        """The base serving ``model_id`` and the adapter name (None: the plain base)."""
        for b in self.bases.values():
            if model_id == b.name:
                return b, None
            if model_id in b.adapters:
                return b, model_id
        raise KeyError(model_id)


def _check_id(mid: str, seen: dict[str, str], where: str) -> None:
    if not _ID.match(mid):
        raise EdgetuneError(f"{mid!r} is not a usable model id.", where=where, fix="use letters, digits, . _ - : /")
    if mid in seen:
        raise EdgetuneError(f"Model id {mid!r} is used twice ({seen[mid]} and {where}).", where=where,
                            fix="every base, adapter and route needs its own id")
    seen[mid] = where


REGISTRY_PREFIX = "registry:"


def resolve_source(source: str):
    """A registry reference (``NAME@ALIAS``, ``NAME:vN``, ``NAME``) → (entry, the GGUF it serves)."""
    from ..aliases import resolve_ref, serving_gguf

    entry = resolve_ref(source)
    return entry, serving_gguf(entry)


def _file(value: Any, root: Path, where: str) -> Path:
    if not isinstance(value, str | Path) or not str(value):
        raise EdgetuneError(f"{where}: expected a file path, got {value!r}.", where=where)
    p = Path(value).expanduser()
    p = p if p.is_absolute() else root / p
    if not p.is_file():
        raise EdgetuneError(f"GGUF file not found: {p}", where=where, fix="fix the path (relative paths start at the config's folder)", exit_code=2)
    return p


def from_dict(raw: dict, root: Path, where: str = "serve config") -> TeamConfig:
    """Validate a parsed YAML mapping; file paths are resolved against ``root``."""
    if not isinstance(raw, dict):
        raise EdgetuneError(f"{where}: expected a mapping at the top level.", where=where)
    unknown = set(raw) - {"bases", "routes", "limits", "log"}
    if unknown:
        raise EdgetuneError(f"{where}: unknown section(s) {sorted(unknown)}.", where=where, fix="sections: bases, routes, limits, log")
    bases: dict[str, BaseSpec] = {}
    for name, b in (raw.get("bases") or {}).items():
        w = f"{where}: bases.{name}"
        b = {"path": b} if isinstance(b, str) else (b or {})
        adapters = {}
        for an, a in (b.get("adapters") or {}).items():
            a = {"path": a} if isinstance(a, str) else (a or {})
            adapters[str(an)] = AdapterSpec(str(an), _file(a.get("path"), root, f"{w}.adapters.{an}"), float(a.get("scale", 1.0)))
        parallel = b.get("parallel", DEFAULT_PARALLEL)
        if not isinstance(parallel, int) or isinstance(parallel, bool) or not 1 <= parallel <= 64:
            raise EdgetuneError(f"{w}.parallel: expected a whole number from 1 to 64, got {parallel!r}.", where=where,
                                fix="parallel: 8 (requests decoded together; 1 = one at a time)")
        prefix_cache, flash_attn = b.get("prefix_cache", True), b.get("flash_attn", "auto")
        if not isinstance(prefix_cache, bool):
            raise EdgetuneError(f"{w}.prefix_cache: expected true or false, got {prefix_cache!r}.", where=where,
                                fix="prefix_cache: true")
        if flash_attn != "auto" and not isinstance(flash_attn, bool):
            raise EdgetuneError(f"{w}.flash_attn: expected true, false or auto, got {flash_attn!r}.", where=where,
                                fix="flash_attn: auto (on when parallel > 1)")
        raw_path = b.get("path")
        if isinstance(raw_path, str) and raw_path.startswith(REGISTRY_PREFIX):  # follows a registry alias
            source = raw_path[len(REGISTRY_PREFIX):]
            try:
                entry, path = resolve_source(source)
            except EdgetuneError as exc:
                raise EdgetuneError(f"{w}: {exc.message}", where=where, fix=exc.fix) from None
            version = entry.ref
        else:
            source, version, path = None, None, _file(raw_path, root, w)
        bases[str(name)] = BaseSpec(str(name), path, adapters, int(b.get("n_ctx", 2048)),
                                    b.get("n_threads"), parallel, prefix_cache, None if flash_attn == "auto" else flash_attn,
                                    source, version)
    routes = {}
    for name, r in (raw.get("routes") or {}).items():
        r = r or {}
        canary = None
        if r.get("canary") is not None:
            c = r["canary"]
            try:
                promote = c.get("promote") or {}
                canary = CanarySpec(str(c["stable"]), str(c["candidate"]), float(c.get("share", 10)),
                                    int(c.get("min_outcomes", 30)), int(c.get("max_outcomes", 400)),
                                    float(c.get("alpha", 0.05)), float(c.get("margin", 0.05)),
                                    promote.get("model"), str(promote.get("alias", "prod")))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise EdgetuneError(f"{where}: routes.{name}.canary is not valid ({exc}).", where=where,
                                    fix="canary: {stable: ID, candidate: ID, share: 10, promote: {model: NAME, alias: prod}}") from None
        routes[str(name)] = RouteSpec(str(name), {str(k): float(v) for k, v in (r.get("split") or {}).items()},
                                      r.get("primary"), r.get("shadow"), canary)
    limits, log = raw.get("limits") or {}, raw.get("log") or {}
    shadow_log = log.get("shadow_log")
    feedback_log = log.get("feedback_log")
    feedback_log = (root / feedback_log) if feedback_log else ((root / shadow_log).parent / "feedback.jsonl" if shadow_log else None)
    return TeamConfig(bases, routes, int(limits.get("queue_depth", 8)), float(limits.get("queue_timeout", 30)),
                      float(limits.get("memory_cap_mb", 0)), (root / shadow_log) if shadow_log else None,
                      bool(log.get("log_text", False)), feedback_log, float(log.get("feedback_ttl_s", 86400)))


def load_team_config(path: str | Path) -> TeamConfig:
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EdgetuneError(f"Cannot read the serve config ({exc}).", where=str(path), exit_code=2) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise EdgetuneError(f"The serve config is not valid YAML ({exc}).", where=where, exit_code=2) from None
    return from_dict(raw, path.resolve().parent, str(path))


def parse_pair(item: str, flag: str) -> tuple[str, str]:
    """``NAME=VALUE`` from a repeated flag."""
    name, sep, value = item.partition("=")
    if not sep or not name or not value:
        raise EdgetuneError(f"{flag} {item!r}: expected NAME=VALUE.", fix=f"e.g. {flag} support=support.lora.gguf")
    return name, value


def from_flags(model: str | Path | None, *, alias: str | None = None, loras: tuple[str, ...] = (), splits: tuple[str, ...] = (),
               shadows: tuple[str, ...] = (), n_ctx: int = 2048, **limits) -> TeamConfig:
    """The same config from flags: ``MODEL --lora NAME=FILE … --split ROUTE=A:90,B:10 --shadow ROUTE=PRIMARY:CANDIDATE``."""
    if model is None:
        raise EdgetuneError("No model to serve.", fix="edgetune serve MODEL.gguf [--lora NAME=FILE]…  or  --config team.yaml")
    raw: dict = {"bases": {alias or Path(model).stem: {"path": str(model), "n_ctx": n_ctx,
                                                       "adapters": dict(parse_pair(x, "--lora") for x in loras)}}}
    routes: dict = {}
    for item in splits:
        name, value = parse_pair(item, "--split")
        split = {}
        for part in value.split(","):
            mid, _, w = part.partition(":")
            try:
                split[mid] = float(w or 1)
            except ValueError:
                raise EdgetuneError(f"--split {item!r}: weight {w!r} is not a number.", fix="--split ROUTE=a:90,b:10") from None
        routes[name] = {"split": split}
    for item in shadows:
        name, value = parse_pair(item, "--shadow")
        primary, _, cand = value.partition(":")
        routes[name] = {"primary": primary, "shadow": cand or None}
    raw["routes"] = routes
    log = {k: limits.pop(k) for k in ("shadow_log", "log_text", "feedback_log") if limits.get(k) is not None}
    raw["log"] = {k: str(v) if k in ("shadow_log", "feedback_log") else v for k, v in log.items()}
    raw["limits"] = {k: v for k, v in limits.items() if v is not None}
    return from_dict(raw, Path.cwd(), "flags")
