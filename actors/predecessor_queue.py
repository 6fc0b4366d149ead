"""The outputs module k-1 pushes to module k in parallel MREM."""
from __future__ import annotations

import collections
import threading
import time
from typing import Any

import numpy as np


class PredecessorQueue:
    """The outputs module k-1 pushes in MREM-P, taken in order by module k.

    While the predecessor trains, take() waits (at most wait_s) for its next push instead of
    re-using an old one: a successor that ran ahead would repeat stale batches and finish
    before it saw the predecessor's last, best-trained outputs. Once the predecessor has
    finished (or on a timeout, e.g. while it restarts) take() returns one of the recent items.
    """

    def __init__(self, maxlen: int, wait_s: float, seed: int = 0):
        self.items: collections.deque = collections.deque(maxlen=maxlen)
        self.recent: collections.deque = collections.deque(maxlen=maxlen)
        self.cond = threading.Condition()
        self.finished, self.wait_s = False, wait_s
        self.repeats, self.waited_s, self.bytes = 0, 0.0, 0
        self.rng = np.random.default_rng(seed)

    def put(self, item: Any, nbytes: int = 0) -> None:
        with self.cond:
            self.items.append(item)
            self.bytes += nbytes
            self.cond.notify_all()

    def finish(self) -> None:
        with self.cond:
            self.finished = True
            self.cond.notify_all()

    def first(self, timeout_s: float) -> bool:
        """Wait for the first push; False on a timeout."""
        with self.cond:
            return self.cond.wait_for(lambda: self.items or self.recent or self.finished, timeout_s)

    def take(self) -> Any:
        """The next push (waited for while the predecessor trains), else a recent one, else None."""
        with self.cond:
            if not self.items and self.recent and not self.finished:
                start = time.time()
                self.cond.wait_for(lambda: self.items or self.finished, self.wait_s)
                self.waited_s += time.time() - start
            if self.items:
                self.recent.append(self.items.popleft())
                return self.recent[-1]
            if not self.recent:
                return None
            self.repeats += 1
            return self.recent[int(self.rng.integers(len(self.recent)))]
