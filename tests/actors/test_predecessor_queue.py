"""PredecessorQueue: how module k takes module k-1's pushes in parallel MREM (no Ray needed)."""
from __future__ import annotations

import threading
import time

from actors.predecessor_queue import PredecessorQueue


def _put_later(q: PredecessorQueue, item, delay: float) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), q.put(item)))
    t.start()
    return t


def test_nothing_pushed_yet_gives_none():
    assert PredecessorQueue(4, wait_s=0.05).take() is None


def test_items_come_in_order_and_an_empty_queue_waits_for_the_next_push():
    q = PredecessorQueue(4, wait_s=10.0)
    q.put("a")
    q.put("b")
    assert [q.take(), q.take()] == ["a", "b"]
    t = _put_later(q, "c", 0.3)
    start = time.time()
    assert q.take() == "c"  # not a repeat of "b": the successor keeps pace with the predecessor
    assert 0.2 < time.time() - start < 5 and q.repeats == 0 and q.waited_s > 0.2
    t.join()


def test_after_the_predecessor_finished_recent_items_are_reused_without_waiting():
    q = PredecessorQueue(2, wait_s=10.0)
    for item in "xyz":
        q.put(item)
    q.finish()
    assert [q.take(), q.take()] == ["y", "z"]  # maxlen 2: the oldest push was dropped
    start = time.time()
    again = {q.take() for _ in range(20)}
    assert again <= {"y", "z"} and time.time() - start < 1 and q.repeats == 20


def test_a_silent_predecessor_costs_at_most_wait_s_per_take():
    q = PredecessorQueue(4, wait_s=0.1)
    q.put("a")
    q.take()
    start = time.time()
    assert q.take() == "a" and q.repeats == 1
    assert 0.08 < time.time() - start < 2


def test_first_waits_for_the_first_push():
    q = PredecessorQueue(4, wait_s=1.0)
    assert not q.first(0.05)
    t = _put_later(q, "a", 0.1)
    assert q.first(5.0) and q.take() == "a"
    t.join()


def test_pushed_bytes_are_counted_even_when_old_pushes_are_dropped():
    q = PredecessorQueue(1, wait_s=0.05)
    q.put("a", 100)
    q.put("b", 20)  # maxlen 1 drops "a", but its bytes still crossed the object store
    assert q.bytes == 120 and q.take() == "b"
