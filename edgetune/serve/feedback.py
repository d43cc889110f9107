"""User feedback on served answers: ``POST /v1/feedback`` and the requests it can refer to.

The server remembers each answered chat request for ``feedback_ttl_s`` (model, route, canary side;
the prompt and the answer only with ``log_text``, so a private deployment keeps no text). Feedback
names a request id the server answered (``id`` of the response, also the ``x-request-id`` header)::

    POST /v1/feedback  {"request_id": "chatcmpl-…", "rating": "up" | "down",
                        "correction": "the answer it should have given", "tags": ["tone"]}

and becomes one line of the feedback log (JSONL beside the shadow log)::

    {"ts", "kind": "feedback", "request_id", "model", "route"?, "side"?, "rating", "tags"?,
     "messages"?, "answer"?, "correction"?}     # texts only with log_text

``edgetune data from-logs`` turns these lines into training rows and preference pairs.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

MAX_REMEMBERED = 20000


class FeedbackError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Answered:
    model: str
    at: float
    route: str | None = None
    side: str | None = None  # canary side, when a canary route answered
    messages: list | None = None  # only with log_text
    answer: str | None = None  # only with log_text
    rated: bool = False


class RecentRequests:
    """Request id → :class:`Answered`, for ``ttl`` seconds, at most :data:`MAX_REMEMBERED` (oldest go first)."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self._items: OrderedDict[str, Answered] = OrderedDict()
        self._forgotten: OrderedDict[str, float] = OrderedDict()  # ids that expired (to say so), bounded too
        self._lock = threading.Lock()

    def add(self, rid: str, item: Answered) -> None:
        with self._lock:
            self._items[rid] = item
            self._expire(time.time())
            while len(self._items) > MAX_REMEMBERED:
                old, _ = self._items.popitem(last=False)
                self._remember_forgotten(old)

    def _expire(self, now: float) -> None:
        while self._items:
            rid, first = next(iter(self._items.items()))
            if now - first.at <= self.ttl:
                break
            self._items.popitem(last=False)
            self._remember_forgotten(rid)

    def _remember_forgotten(self, rid: str) -> None:
        self._forgotten[rid] = time.time()
        while len(self._forgotten) > MAX_REMEMBERED:
            self._forgotten.popitem(last=False)

    def take(self, rid: str) -> tuple[Answered, bool]:
        """(the request ``rid`` names, whether this is its first rating); :class:`FeedbackError` 404
        when unknown or expired."""
        with self._lock:
            self._expire(time.time())
            item = self._items.get(rid)
            if item is None:
                if rid in self._forgotten:
                    raise FeedbackError(404, f"request {rid!r} has expired: feedback is taken for {self.ttl:g} s "
                                             "after the answer (log.feedback_ttl_s)")
                raise FeedbackError(404, f"request {rid!r} is unknown here: not answered by this server, "
                                         "or answered before it restarted")
            first, item.rated = not item.rated, True
            return item, first


def parse_feedback(body) -> tuple[str, str, str | None, list[str]]:
    """(request_id, rating, correction, tags) from a feedback body; :class:`FeedbackError` 400 naming the field."""
    if not isinstance(body, dict):
        raise FeedbackError(400, "the feedback body must be a JSON object")
    rid = body.get("request_id")
    if not isinstance(rid, str) or not rid:
        raise FeedbackError(400, "`request_id` (the id of the answer) is required")
    rating = body.get("rating")
    if rating not in ("up", "down"):
        raise FeedbackError(400, "`rating` must be \"up\" or \"down\"")
    correction = body.get("correction")
    if correction is not None and (not isinstance(correction, str) or not correction.strip()):
        raise FeedbackError(400, "`correction` must be a non-empty string when given")
    tags = body.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise FeedbackError(400, "`tags` must be a list of strings")
    return rid, rating, correction, tags
