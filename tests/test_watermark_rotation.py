"""mTLS rotation under watermark RPC load, end to end (docs/DESIGN.md §5): zero failed requests.

LocalStack runs the runtime in-process with the fake mTLS watermark service. Clients are threads,
each with its own keep-alive connection, calling the signed POST /v1/rpc/watermark in a loop while
client certificates issued by the stack's CA are delivered over the real secrets listener.
The fake records the client certificate of every connection it accepts, and answers with the CN
of the connection's certificate, so each answer says which certificate carried it.

Bounded: by request count per client, by rotation count and by a wall-clock deadline.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import threading
import time
import unittest
from unittest import mock

from cryptography.hazmat.primitives import serialization

from tests.fakes import fake_watermark
from tests.stack import LocalStack
from tests.support import keep_off_console

TARGET = "/v1/rpc/watermark"
CLIENTS = 4  # concurrent clients; make bench runs the heavy version (16 x 100 rotations)
ROTATIONS = 12
CERTIFICATES = 3  # rotations alternate among these
MAX_REQUESTS_PER_CLIENT = 20_000
DEADLINE_S = 18.0  # the whole load test, rotations included
PROGRESS_TIMEOUT_S = 3.0  # after an ack, every client must complete a request within this
HOLD_TIMEOUT_S = 5.0


def fingerprint(issued) -> str:
    """What the fake records: sha256 of the client certificate's DER."""
    return hashlib.sha256(issued.cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def cn(issued) -> str:
    return issued.cert.subject.rfc4514_string().removeprefix("CN=")


def check_answer(status, answer, body: dict) -> str | None:
    """None when the answer is a signed watermark of `body`; else what is wrong."""
    if status != 200:
        return f"HTTP {status}: {answer!r}"[:300]
    if not isinstance(answer, dict) or not isinstance(answer.get("result"), dict):
        return f"no result: {answer!r}"[:300]
    if answer["result"].get("watermark") != fake_watermark.watermark_for(body)["watermark"]:
        return f"wrong watermark: {answer!r}"[:300]
    try:
        if not base64.b64decode(answer.get("signature") or "", validate=True):
            return "empty signature"
    except ValueError:
        return f"signature is not base64: {answer.get('signature')!r}"[:300]
    return None


class _Client(threading.Thread):
    """One keep-alive connection, signed watermark RPCs in a loop until stopped."""

    def __init__(self, stack: LocalStack, index: int, stop: threading.Event, deadline: float):
        super().__init__(name=f"wm-client-{index}", daemon=True)
        self.stack, self.index, self.stop, self.deadline = stack, index, stop, deadline
        self.ok = 0
        self.failures: list[str] = []
        self.last_started = 0.0  # monotonic start of the last request that completed
        self.cns: set[str] = set()

    def run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.stack.port, timeout=15)
        try:
            for n in range(MAX_REQUESTS_PER_CLIENT):
                if self.stop.is_set() or time.monotonic() > self.deadline:
                    break
                body = {"client": self.index, "n": n}
                started = time.monotonic()
                try:
                    status, answer = self.stack.call("POST", TARGET, json.dumps(body).encode(),
                                                     conn=conn)
                    problem = check_answer(status, answer, body)
                except (OSError, http.client.HTTPException) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.stack.port, timeout=15)
                if problem:
                    self.failures.append(problem)
                else:
                    self.ok += 1
                    self.cns.add(answer["result"].get("client"))
                self.last_started = started
        finally:
            conn.close()


class WatermarkRotationTest(unittest.TestCase):
    def setUp(self):
        self.addCleanup(keep_off_console("enclave"))
        self.stack = LocalStack(google=False)
        self.addCleanup(self.stack.close)
        self.fake = self.stack.fake_wm

    def deliver(self, issued) -> dict:
        ack = self.stack.deliver(self.stack.mtls_payload(issued))
        self.assertTrue(ack.get("ok"), ack)
        self.assertTrue(ack.get("changed"), ack)
        return ack

    def signed_call(self, body: dict, conn=None):
        return self.stack.call("POST", TARGET, json.dumps(body).encode(), conn=conn)

    def test_rotations_under_concurrent_load_fail_no_request(self):
        certs = [self.stack.client] + [self.stack.ca.issue(f"enclave-client-{i + 2}")
                                       for i in range(CERTIFICATES - 1)]
        self.deliver(certs[0])
        status, answer = self.signed_call({"warm": True})
        self.assertIsNone(check_answer(status, answer, {"warm": True}))

        started = time.monotonic()
        deadline = started + DEADLINE_S
        stop = threading.Event()
        clients = [_Client(self.stack, i, stop, deadline) for i in range(CLIENTS)]
        for client in clients:
            client.start()
        try:
            acks, marks = [], []  # marks[i]: how many connections the fake had seen at ack i
            for i in range(ROTATIONS):
                # Every client completes a request that started after the previous swap: the
                # new generation is in use, then the next rotation lands on it.
                self.wait_all_progressed(clients, time.monotonic(), deadline)
                issued = certs[(i + 1) % CERTIFICATES]
                acks.append(self.deliver(issued))
                marks.append((len(self.fake.clients), fingerprint(issued)))
            self.wait_all_progressed(clients, time.monotonic(), deadline)
        finally:
            stop.set()
            for client in clients:
                client.join(timeout=20)
        elapsed = time.monotonic() - started
        self.assertFalse(any(c.is_alive() for c in clients), "a client thread did not stop")

        failures = [f for c in clients for f in c.failures]
        total_ok = sum(c.ok for c in clients)
        self.assertEqual(failures, [], f"{len(failures)} failed of {total_ok + len(failures)}")
        self.assertEqual(len(acks), ROTATIONS)
        self.assertEqual([a["version"] for a in acks],
                         list(range(acks[0]["version"], acks[0]["version"] + ROTATIONS)))
        self.assertLess(elapsed, DEADLINE_S)

        seen = [fp for fp, _ in self.fake.clients]
        self.assertGreater(len(set(seen)), 1, "the fake saw one client certificate only")
        self.assertEqual(set(seen), {fingerprint(c) for c in certs})
        self.assertEqual(set().union(*(c.cns for c in clients)), {cn(c) for c in certs})

        # After the last rotation, the next new connection presents the last certificate (and
        # so does every later one: no connection of a retired context is made after the swap).
        last_mark, last_fp = marks[-1]
        after = seen[last_mark:]
        self.assertTrue(after, "no new connection after the last rotation")
        self.assertEqual(after[0], last_fp, "the first connection after the last rotation "
                                            "presented a retired certificate")
        self.assertEqual(set(after), {last_fp})
        # And a request now (load stopped) is carried by the last certificate.
        status, answer = self.signed_call({"after": "load"})
        self.assertIsNone(check_answer(status, answer, {"after": "load"}))
        self.assertEqual(answer["result"]["client"], cn(certs[ROTATIONS % CERTIFICATES]))

    def wait_all_progressed(self, clients, since: float, deadline: float) -> None:
        limit = min(deadline, time.monotonic() + PROGRESS_TIMEOUT_S)
        while not all(c.last_started >= since for c in clients):
            dead = [c.name for c in clients if not c.is_alive()]
            failures = [f for c in clients for f in c.failures]
            if dead or failures or time.monotonic() > limit:
                self.fail(f"clients stalled (dead: {dead}, failures: {failures[:3]})")
            time.sleep(0.002)

    def test_request_in_flight_on_the_old_context_finishes_across_a_swap(self):
        old, new = self.stack.client, self.stack.ca.issue("enclave-client-new")
        self.deliver(old)
        status, answer = self.signed_call({"warm": True})
        self.assertIsNone(check_answer(status, answer, {"warm": True}))
        self.assertEqual(answer["result"]["client"], cn(old))

        # The fake holds the answer to a body with "hold" until released (patched in-process:
        # the fake has no slow mode), so that request stays in flight on an old-context
        # connection while the rotation lands.
        entered, release = threading.Event(), threading.Event()
        original = fake_watermark.watermark_for

        def slow_watermark_for(body):
            if isinstance(body, dict) and body.get("hold"):
                entered.set()
                release.wait(HOLD_TIMEOUT_S)
            return original(body)

        held_body = {"hold": True}
        held: dict = {}

        def hold():
            try:
                held["answer"] = self.signed_call(held_body)
            except Exception as exc:  # reported by the assertions below
                held["error"] = exc

        with mock.patch.object(fake_watermark, "watermark_for", slow_watermark_for):
            holder = threading.Thread(target=hold, name="held-request", daemon=True)
            holder.start()
            try:
                self.assertTrue(entered.wait(HOLD_TIMEOUT_S), "the held request never arrived")
                old_connections = len(self.fake.clients)

                self.deliver(new)  # the swap, acked while the old request is in flight
                self.assertTrue(holder.is_alive())
                # Meanwhile a new request goes over a new connection with the new certificate.
                status, answer = self.signed_call({"during": "hold"})
                self.assertIsNone(check_answer(status, answer, {"during": "hold"}))
                self.assertEqual(answer["result"]["client"], cn(new))
                self.assertEqual(self.fake.clients[old_connections:][0][0], fingerprint(new))
                self.assertTrue(holder.is_alive(), "the held request ended before its release")
            finally:
                release.set()
                holder.join(timeout=HOLD_TIMEOUT_S + 5)
        self.assertFalse(holder.is_alive())
        self.assertNotIn("error", held)
        status, answer = held["answer"]
        # The in-flight request finished normally, on the old certificate, and is signed.
        self.assertIsNone(check_answer(status, answer, held_body))
        self.assertEqual(answer["result"]["client"], cn(old))

        # Its connection was not pooled for reuse: later requests ride the new certificate
        # only, and no connection presenting the old one is made after the swap.
        for n in range(5):
            status, answer = self.signed_call({"after": n})
            self.assertIsNone(check_answer(status, answer, {"after": n}))
            self.assertEqual(answer["result"]["client"], cn(new))
        self.assertEqual({fp for fp, _ in self.fake.clients[old_connections:]}, {fingerprint(new)})


if __name__ == "__main__":
    unittest.main()
