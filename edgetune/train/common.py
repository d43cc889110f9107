"""Pieces both backends share: resume keys, the stop-at-step-boundary signal handler."""

from __future__ import annotations

import signal
import threading

from ..errors import EdgetuneError

# settings that change which batches a step sees: a resumed run must not differ in them
RESUME_KEYS = ("seed", "batch_size", "grad_accum", "max_seq_len", "packing", "group_by_length", "method", "rank", "objective")


class TrainingInterrupted(EdgetuneError):
    """SIGINT/SIGTERM stopped training at a step boundary after writing checkpoints/last."""


class StopFlag:
    """First SIGINT/SIGTERM asks the loop to stop at the next step boundary (it then checkpoints);
    a second SIGINT interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)
