"""Checks of the consumer's bookkeeping and the publisher's retries (no
broker needed):

    python -m unittest test_flow
"""

import re
import unittest

from sluice_client import (RETRY_CODES, AckTracker, Backoff, CreditWindow, new_trace_id, retry,
                           traceparent)


class CreditWindowTest(unittest.TestCase):
    def test_tops_up_what_was_spent_in_grants_of_half_the_window(self):
        w = CreditWindow(8)
        self.assertEqual(w.opening_grant(), 8)
        grants = [w.handled() for _ in range(20)]
        self.assertEqual(grants, [0, 0, 0, 4] * 5)
        # Never more than the window outstanding, never stalled: after any
        # number of handled deliveries, granted - handled stays in 1..8.
        granted, handled = 8, 0
        for g in [w.handled() for _ in range(100)]:
            handled += 1
            granted += g
            self.assertTrue(1 <= granted - handled <= 8)

    def test_a_window_of_one_grants_one_per_delivery(self):
        w = CreditWindow(1)
        self.assertEqual(w.opening_grant(), 1)
        self.assertEqual([w.handled() for _ in range(3)], [1, 1, 1])

    def test_a_new_stream_starts_with_the_whole_window_again(self):
        w = CreditWindow(10)
        w.opening_grant()
        w.handled()
        w.handled()
        self.assertEqual(w.opening_grant(), 10)
        self.assertEqual([w.handled() for _ in range(5)], [0, 0, 0, 0, 5])


class AckTrackerTest(unittest.TestCase):
    def test_acks_what_is_finished_in_order(self):
        t = AckTracker()
        for s in (1, 2, 3):
            t.started(s, f"id{s}")
            t.finish(s, f"id{s}")
        taken = t.take_ackable()
        self.assertEqual(taken, [(1, "id1"), (2, "id2"), (3, "id3")])
        t.acked(taken)
        self.assertEqual(t.take_ackable(), [])
        self.assertEqual(t.acked_upto, 3)

    def test_never_acks_past_a_failed_message(self):
        t = AckTracker()
        t.started(1, "a")
        t.finish(1, "a")
        t.started(2, "b")  # fails: nacked, stays unfinished
        for s in (3, 4):
            t.started(s, str(s))
            t.finish(s, str(s))
        taken = t.take_ackable()
        self.assertEqual(taken, [(1, "a")])
        t.acked(taken)
        self.assertEqual(t.take_ackable(), [])  # 3 and 4 wait for 2
        self.assertFalse(t.is_duplicate(2))  # its redelivery is processed
        t.finish(2, "b")
        self.assertEqual([s for s, _ in t.take_ackable()], [2, 3, 4])

    def test_duplicates_after_a_reconnect_are_recognised_and_acked_in_order(self):
        t = AckTracker()
        for s in (1, 2, 3):
            t.started(s, str(s))
        t.finish(1, "1")
        t.acked(t.take_ackable())
        t.finish(3, "3")  # 2 failed; 3 finished but cannot be acked yet
        t.new_stream()  # the broker delivers 2 and 3 again
        self.assertEqual(t.take_ackable(), [])  # nothing before 2 comes back
        self.assertTrue(t.is_duplicate(1))
        self.assertFalse(t.is_duplicate(2))
        self.assertTrue(t.is_duplicate(3))
        t.started(2, "2")
        t.finish(2, "2")
        self.assertEqual(t.take_ackable(), [(2, "2")])
        t.finish(3, "3")  # the duplicate, handled without processing
        taken = t.take_ackable()
        self.assertEqual([s for s, _ in taken], [2, 3])
        t.acked(taken)
        self.assertEqual(t.done_earlier, set())
        self.assertEqual(t.pending_acks(), 0)


class BackoffTest(unittest.TestCase):
    def test_doubles_up_to_the_cap_with_jitter_in_the_upper_half(self):
        low = Backoff(base=0.1, cap=2.0, rng=lambda: 0.0)
        high = Backoff(base=0.1, cap=2.0, rng=lambda: 0.999999)
        lows = [round(low.next_delay(), 3) for _ in range(8)]
        highs = [round(high.next_delay(), 3) for _ in range(8)]
        self.assertEqual(lows, [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
        self.assertEqual(highs, [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0])
        low.reset()
        self.assertEqual(round(low.next_delay(), 3), 0.05)


class Failed(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


class RetryTest(unittest.TestCase):
    def run_retry(self, outcomes, attempts=5):
        """retry() over a call that raises Failed(code) or returns each of
        `outcomes` in turn: (result or error, calls made, delays slept)."""
        calls, slept, told = [], [], []

        def call():
            calls.append(1)
            o = outcomes[len(calls) - 1]
            if isinstance(o, Exception):
                raise o
            return o

        backoff = Backoff(base=0.1, cap=0.4, rng=lambda: 0.999999)
        backoff.next_delay()  # left over from an earlier call: retry() starts afresh
        try:
            result = retry(call, code_of=lambda e: getattr(e, "code", None), backoff=backoff,
                           attempts=attempts, sleep=slept.append,
                           on_retry=lambda e, code, n, d: told.append((code, n)))
        except Exception as e:  # the test looks at it
            result = e
        self.assertEqual(len(told), len(slept))
        return result, len(calls), [round(d, 3) for d in slept]

    def test_retries_only_when_the_outcome_is_unknown(self):
        self.assertEqual(RETRY_CODES, {"UNAVAILABLE", "DEADLINE_EXCEEDED"})
        result, calls, slept = self.run_retry(
            [Failed("UNAVAILABLE"), Failed("DEADLINE_EXCEEDED"), Failed("UNAVAILABLE"), "ok"])
        self.assertEqual((result, calls, slept), ("ok", 4, [0.1, 0.2, 0.4]))
        for answer in ("INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "INTERNAL"):
            result, calls, slept = self.run_retry([Failed(answer), "ok"])
            self.assertEqual((result.code, calls, slept), (answer, 1, []))
        result, calls, _ = self.run_retry([ValueError("not gRPC"), "ok"])
        self.assertIsInstance(result, ValueError)
        self.assertEqual(calls, 1)

    def test_gives_up_after_the_last_attempt_with_capped_delays(self):
        result, calls, slept = self.run_retry([Failed("UNAVAILABLE")] * 6, attempts=6)
        self.assertEqual((result.code, calls), ("UNAVAILABLE", 6))
        self.assertEqual(slept, [0.1, 0.2, 0.4, 0.4, 0.4])


class TraceparentTest(unittest.TestCase):
    def test_is_w3c_version_00_sampled_with_a_new_span_each_time(self):
        trace = new_trace_id()
        a, b = traceparent(trace), traceparent(trace)
        for tp in (a, b):
            self.assertRegex(tp, r"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$")
            self.assertEqual(tp.split("-")[1], trace)
        self.assertNotEqual(a.split("-")[2], b.split("-")[2])
        self.assertIsNotNone(re.fullmatch(r"[0-9a-f]{32}", trace))
        self.assertNotEqual(int(trace, 16), 0)


if __name__ == "__main__":
    unittest.main()
