"""A gated canary: a share of a route's traffic goes to a candidate; outcomes decide its fate.

Outcomes are successes and failures per side (``stable``, ``candidate``): a user's feedback
(``POST /v1/feedback``: up = success, down = failure) on a request the canary routed, and a task check
when the request carried ``metadata.reference`` (the answer scored with the eval metrics the reference
calls for; success when the mean score is at least 0.5).

The decision, once each side has ``min_outcomes``: with p the success rates and
se = sqrt(p_c(1-p_c)/n_c + p_s(1-p_s)/n_s) (Wald, unpooled), z = the one-sided ``1 - alpha`` normal quantile,

* **roll back** when the candidate is worse beyond doubt: ``(p_c - p_s) + z·se < 0``;
* **promote** when it is not worse by more than ``margin``: ``(p_c - p_s) - z·se > -margin``
  (a non-inferiority test);
* otherwise keep collecting; at ``max_outcomes`` per side without a verdict, roll back (inconclusive:
  the stable model stays).

Promotion moves the registry alias named in the route (``promote: {model, alias}``) to the
candidate's version, so a base served as ``registry:NAME@prod`` switches over; either decision sends
all of the route's traffic to ``stable`` from then on. Every decision is logged with its numbers, and
``POST /v1/canary/ROUTE`` (``promote``, ``rollback``, ``pause``, ``resume``) overrides it by hand.
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
from dataclasses import dataclass, field
from statistics import NormalDist

from .team_config import CanarySpec

SIDES = ("stable", "candidate")


def verdict(succ_s: int, n_s: int, succ_c: int, n_c: int, *, alpha: float, margin: float,
            min_outcomes: int, max_outcomes: int) -> tuple[str | None, dict]:
    """(``promote`` / ``rollback`` / None, the numbers behind it) for the outcomes so far."""
    nums: dict = {"stable": {"successes": succ_s, "outcomes": n_s}, "candidate": {"successes": succ_c, "outcomes": n_c},
                  "alpha": alpha, "margin": margin, "test": "one-sided Wald interval on p_candidate - p_stable"}
    if min(n_s, n_c) < min_outcomes:
        return None, nums
    ps, pc = succ_s / n_s, succ_c / n_c
    se = math.sqrt(ps * (1 - ps) / n_s + pc * (1 - pc) / n_c) or 1e-9
    z = NormalDist().inv_cdf(1 - alpha)
    diff = pc - ps
    nums.update(p_stable=round(ps, 4), p_candidate=round(pc, 4), difference=round(diff, 4), se=round(se, 4),
                lower=round(diff - z * se, 4), upper=round(diff + z * se, 4))
    if diff + z * se < 0:
        return "rollback", {**nums, "why": "the candidate is worse (upper bound of the difference < 0)"}
    if diff - z * se > -margin:
        return "promote", {**nums, "why": f"the candidate is not worse by more than {margin:g} (lower bound > -margin)"}
    if min(n_s, n_c) >= max_outcomes:
        return "rollback", {**nums, "why": f"no verdict after {max_outcomes} outcomes a side: the stable model stays"}
    return None, nums


@dataclass
class Canary:
    route: str
    spec: CanarySpec
    status: str = "running"  # running | paused | promoted | rolled_back
    outcomes: dict = field(default_factory=lambda: {s: [0, 0] for s in SIDES})  # side → [successes, outcomes]
    decision: dict | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def pick(self, user: str | None, rng: random.Random | None = None) -> tuple[str, str]:
        """(model id, side) for one request: the candidate for ``share`` % of traffic while running."""
        if self.status != "running" or self.spec.share <= 0:
            return self.spec.stable, "stable"
        if user:  # sticky per user, like split routes
            x = int.from_bytes(hashlib.sha256(f"{self.route}\0{user}".encode()).digest()[:8], "big") / 2**64
        else:
            x = (rng or random).random()
        return (self.spec.candidate, "candidate") if x * 100 < self.spec.share else (self.spec.stable, "stable")

    def record(self, side: str, success: bool) -> tuple[str, dict] | None:
        """Count one outcome; the decision ``(action, numbers)`` when this outcome settles it."""
        with self.lock:
            if self.status != "running":
                return None
            self.outcomes[side][0] += int(success)
            self.outcomes[side][1] += 1
            (ss, ns), (sc, nc) = self.outcomes["stable"], self.outcomes["candidate"]
            action, nums = verdict(ss, ns, sc, nc, alpha=self.spec.alpha, margin=self.spec.margin,
                                   min_outcomes=self.spec.min_outcomes, max_outcomes=self.spec.max_outcomes)
            if action is None:
                return None
            self.settle(action, nums, by="test")
            return action, nums

    def settle(self, action: str, nums: dict, by: str) -> None:
        self.status = {"promote": "promoted", "rollback": "rolled_back", "pause": "paused", "resume": "running"}[action]
        if action in ("promote", "rollback"):
            self.decision = {"action": action, "by": by, **nums}

    def state(self) -> dict:
        (ss, ns), (sc, nc) = self.outcomes["stable"], self.outcomes["candidate"]
        _a, nums = verdict(ss, ns, sc, nc, alpha=self.spec.alpha, margin=self.spec.margin,
                           min_outcomes=self.spec.min_outcomes, max_outcomes=self.spec.max_outcomes)
        return {"route": self.route, "status": self.status, "stable": self.spec.stable, "candidate": self.spec.candidate,
                "share": self.spec.share, "min_outcomes": self.spec.min_outcomes, "max_outcomes": self.spec.max_outcomes,
                "now": nums, "decision": self.decision}
