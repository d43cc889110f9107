"""Prometheus text exposition (format 0.0.4) for the team server, written by hand: a few
counters, gauges and one histogram do not justify a dependency."""

from __future__ import annotations

from collections import defaultdict

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def _labels(**kv) -> str:
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in kv.items())
    return "{" + inner + "}" if inner else ""


class Metrics:
    def __init__(self):
        self.requests = defaultdict(int)  # (model, status) → n
        self.latency = defaultdict(lambda: [0] * (len(BUCKETS) + 1))  # model → bucket counts (+Inf last)
        self.latency_sum = defaultdict(float)
        self.tokens = defaultdict(int)  # model → completion tokens
        self.gen_seconds = defaultdict(float)  # model → seconds generating
        self.shadow = defaultdict(int)  # outcome → n
        self.feedback = defaultdict(int)  # rating → n

    def observe(self, model: str, status: int, seconds: float, completion_tokens: int = 0, gen_seconds: float = 0.0) -> None:
        self.requests[(model, status)] += 1
        if status == 200:
            i = next((i for i, b in enumerate(BUCKETS) if seconds <= b), len(BUCKETS))
            self.latency[model][i] += 1
            self.latency_sum[model] += seconds
            self.tokens[model] += completion_tokens
            self.gen_seconds[model] += gen_seconds

    def render(self, queues: dict[str, tuple[int, int, bool]]) -> str:
        """``queues``: base → (waiting, running, loaded)."""
        out = ["# HELP edgetune_requests_total Requests by model id and HTTP status.", "# TYPE edgetune_requests_total counter"]
        out += [f"edgetune_requests_total{_labels(model=m, status=s)} {n}" for (m, s), n in sorted(self.requests.items())]
        out += ["# HELP edgetune_queue_depth Requests waiting for a turn, per base.", "# TYPE edgetune_queue_depth gauge"]
        out += [f"edgetune_queue_depth{_labels(base=b)} {w}" for b, (w, _, _) in sorted(queues.items())]
        out += ["# HELP edgetune_running Requests generating, per base.", "# TYPE edgetune_running gauge"]
        out += [f"edgetune_running{_labels(base=b)} {r}" for b, (_, r, _) in sorted(queues.items())]
        out += ["# HELP edgetune_base_loaded 1 when the base is in memory.", "# TYPE edgetune_base_loaded gauge"]
        out += [f"edgetune_base_loaded{_labels(base=b)} {int(ld)}" for b, (_, _, ld) in sorted(queues.items())]
        out += ["# HELP edgetune_request_seconds Time from arrival to full answer (200s only).",
                "# TYPE edgetune_request_seconds histogram"]
        for m, counts in sorted(self.latency.items()):
            acc = 0
            for b, c in zip((*BUCKETS, "+Inf"), counts, strict=True):
                acc += c
                out.append(f"edgetune_request_seconds_bucket{_labels(model=m, le=b)} {acc}")
            out.append(f"edgetune_request_seconds_sum{_labels(model=m)} {self.latency_sum[m]:.6f}")
            out.append(f"edgetune_request_seconds_count{_labels(model=m)} {acc}")
        out += ["# HELP edgetune_completion_tokens_total Generated tokens per model.", "# TYPE edgetune_completion_tokens_total counter"]
        out += [f"edgetune_completion_tokens_total{_labels(model=m)} {n}" for m, n in sorted(self.tokens.items())]
        out += ["# HELP edgetune_tokens_per_second Generated tokens per second of generation, per model.",
                "# TYPE edgetune_tokens_per_second gauge"]
        out += [f"edgetune_tokens_per_second{_labels(model=m)} {self.tokens[m] / s:.3f}"
                for m, s in sorted(self.gen_seconds.items()) if s > 0]
        out += ["# HELP edgetune_shadow_total Shadow requests by outcome.", "# TYPE edgetune_shadow_total counter"]
        out += [f"edgetune_shadow_total{_labels(outcome=o)} {n}" for o, n in sorted(self.shadow.items())]
        out += [f"edgetune_feedback_total{_labels(rating=r)} {n}" for r, n in sorted(self.feedback.items())]
        return "\n".join(out) + "\n"
