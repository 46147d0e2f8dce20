"""What an unauthenticated peer can make a real ServerLink do.

A TunnelServer and one ServerLink per attempt run in this process on a
StringTransport and a Clock (the handshake is the same bytes over TLS).
Every handshake message a peer can send — HELLOs with any JSON body, any
frame type with any body, arbitrary bytes — must end in exactly one of: an
ERROR frame with a reason (and the attempt counted as a failed
authentication, so the per-address rate limit applies), a WELCOME, or, when
no complete frame arrived, the handshake deadline. Never a traceback or a
critical log line (`log_failure`, `internal_error`).

Runs follow the hypothesis profile loaded by tests/__init__.py
(HYPOTHESIS_PROFILE=fuzz runs thousands of cases; .ci/run does).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rtunnel import wire
from rtunnel.config import ServerConfig
from rtunnel.server import ServerLink, TunnelServer
from rtunnel.wire import ErrorCode, FrameType
from tests.harness import LogCapture

TOKEN = "handshake-test-token"
HANDSHAKE_TIMEOUT = 10.0
GOOD_RESUME = {"session": "ab" * 16, "secret": "cd" * 32}

# No max_examples here: it comes from the loaded profile (tests/__init__.py).
FUZZ_SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def good_hello(**fields: Any) -> dict[str, Any]:
    hello: dict[str, Any] = {"protocol": "rtunnel", "versions": [1], "token": TOKEN, "max_frame": 1 << 20}
    hello.update(fields)
    return hello


def complete_frames(data: bytes) -> bool:
    """True if `data` holds a whole frame, or a header the server refuses."""
    try:
        return bool(list(wire.FrameDecoder(wire.HANDSHAKE_MAX_FRAME).feed(data)))
    except wire.FrameError:
        return True


def hello_frame(body: dict[str, Any]) -> bytes:
    """A HELLO as a hostile peer writes it: json.dumps escapes lone
    surrogates as \\udXXX, which json.loads turns back into them."""
    return wire.encode(FrameType.HELLO, 0, json.dumps(body).encode())


class Bench:
    """A TunnelServer on a Clock; `attempt` runs one control connection."""

    def __init__(self, state_dir: Path, **overrides: Any) -> None:
        self.clock = Clock()
        config = ServerConfig(
            listen="tcp:0", state_dir=state_dir, token=TOKEN, handshake_timeout=HANDSHAKE_TIMEOUT, **overrides
        )
        self.server = TunnelServer(self.clock, config, TOKEN)
        self.links: list[tuple[ServerLink, StringTransport]] = []

    def attempt(self, data: bytes, host: str = "192.0.2.7") -> tuple[list[wire.Frame], ServerLink, StringTransport]:
        """Connect, send `data`, and return what the server wrote (frames)."""
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        link = ServerLink(self.server)
        link.makeConnection(transport)
        self.links.append((link, transport))
        link.dataReceived(data)
        if not transport.disconnecting:
            self.clock.advance(HANDSHAKE_TIMEOUT + 1)  # the deadline
        self._lose_closed()
        frames = list(wire.FrameDecoder(wire.MAX_U32).feed(transport.value()))
        return frames, link, transport

    def _lose_closed(self) -> None:
        """What the reactor does once a closed socket is gone."""
        for link, transport in self.links:
            if transport.disconnecting and not link.closed.called:
                link.connectionLost(Failure(ConnectionDone()))

    def close(self) -> None:
        for owner in list(self.server.sessions.values()):
            owner.expire("test over")
        self._lose_closed()


class HelloValidationTests(SynchronousTestCase):
    """Each field of HELLO is checked; a bad one is refused with a reason
    that names it, and the refusal counts as a failed authentication."""

    def setUp(self) -> None:
        state_dir = Path(tempfile.mkdtemp(prefix="rtunnel-handshake-"))
        self.addCleanup(shutil.rmtree, state_dir, True)
        self.logs = LogCapture(self)
        self.bench = Bench(state_dir, auth_failure_burst=3, auth_failure_refill=60.0)
        self.addCleanup(self.bench.close)

    def refusal(self, body: dict[str, Any]) -> tuple[int, str]:
        frames, _, transport = self.bench.attempt(hello_frame(body))
        self.assertEqual([f.type for f in frames], [FrameType.ERROR], frames)
        self.assertTrue(transport.disconnecting)
        return wire.decode_coded(frames[0])

    def test_a_lone_surrogate_in_the_token_is_refused_counted_and_rate_limited(self) -> None:
        reasons = []
        for _ in range(5):
            code, reason = self.refusal(good_hello(token="x\ud800"))
            self.assertNotEqual(code, ErrorCode.INTERNAL)
            reasons.append(reason)
        self.assertEqual(self.logs.failures(), [])
        self.assertTrue(all("token" in r for r in reasons[:3]), reasons)
        self.assertTrue(all(r.startswith("too many failed attempts from 192.0.2.7") for r in reasons[3:]), reasons)
        self.assertEqual(self.bench.server.guard.failures, 3)
        self.assertEqual(self.bench.server.guard.refused_attempts, 2)

    def test_every_field_is_checked_with_a_reason_naming_it(self) -> None:
        bad = [
            ({"protocol": "ssh"}, "protocol"),
            ({"protocol": None}, "protocol"),
            ({"versions": "1"}, "versions"),
            ({"versions": []}, "versions"),
            ({"versions": [True]}, "versions"),
            ({"versions": [1.0]}, "versions"),
            ({"versions": list(range(1, 100))}, "versions"),
            ({"versions": [2**70]}, "versions"),
            ({"versions": [99]}, "protocol versions"),
            ({"token": 5}, "token"),
            ({"token": ["x"]}, "token"),
            ({"token": "x" * 5000}, "token"),
            ({"token": "\udfff"}, "token"),
            ({"max_frame": "big"}, "max_frame"),
            ({"max_frame": True}, "max_frame"),
            ({"max_frame": 100}, "max_frame"),
            ({"max_frame": 2**32}, "max_frame"),
            ({"max_frame": 1.5e6}, "max_frame"),
            ({"resume": "yes"}, "resume"),
            ({"resume": {"session": 1, "secret": "cd" * 32}}, "resume"),
            ({"resume": {"session": "ab" * 16}}, "resume"),
            ({"resume": {"session": "ab" * 16, "secret": "cd" * 5000}}, "resume"),
            ({"resume": {"session": "x\ud800" * 16, "secret": "cd" * 32}}, "resume"),
        ]
        bench = self.bench
        for fields, word in bad:
            bench.server.guard = type(bench.server.guard)(bench.clock)  # a fresh budget per case
            code, reason = self.refusal(good_hello(**fields))
            self.assertIn(word, reason, fields)
            self.assertIn(code, (ErrorCode.PROTOCOL_ERROR, ErrorCode.UNSUPPORTED_VERSION), fields)
            self.assertEqual(bench.server.guard.failures, 1, fields)
        self.assertEqual(self.logs.failures(), [])

    def test_a_frame_other_than_hello_is_refused_and_counted(self) -> None:
        for frame in (
            wire.encode_ping(1),
            wire.encode_coded(FrameType.ERROR, 0, ErrorCode.INTERNAL, "hello?"),
            wire.encode_json(FrameType.BIND, {"tunnel": 1, "port": 4000}),
            wire.encode(FrameType.HELLO, 0, b"\xff\xfe not json"),
            wire.encode(FrameType.HELLO, 0, b"[1, 2]"),
            b"\x63" + b"\x00" * 9,  # no such frame type
        ):
            self.bench.server.guard = type(self.bench.server.guard)(self.bench.clock)
            frames, _, _ = self.bench.attempt(frame)
            self.assertEqual([f.type for f in frames], [FrameType.ERROR], frame)
            self.assertEqual(self.bench.server.guard.failures, 1, frame)
        self.assertEqual(self.logs.failures(), [])

    def test_a_valid_hello_with_unknown_keys_and_no_max_frame_is_welcome(self) -> None:
        body = good_hello(future_key={"x": [1]})
        del body["max_frame"]
        frames, _, _ = self.bench.attempt(hello_frame(body))
        self.assertEqual(frames[0].type, FrameType.WELCOME)
        self.assertEqual(self.bench.server.guard.failures, 0)

    def test_a_resume_of_an_unknown_session_gets_a_new_one(self) -> None:
        frames, _, _ = self.bench.attempt(hello_frame(good_hello(resume=GOOD_RESUME)))
        self.assertEqual(frames[0].type, FrameType.WELCOME)
        self.assertFalse(wire.decode_json(frames[0])["resumed"])


# ---------------------------------------------------------------- fuzzing

surrogates = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3)
texts = st.text(max_size=12) | surrogates | st.builds(lambda a, b: a + b, st.text(max_size=4), surrogates)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
# field values near the valid ones, so cases reach deep into the handshake
field_values = {
    "protocol": st.sampled_from(["rtunnel", "rtunnel", "RTUNNEL"]) | json_values,
    "versions": st.sampled_from([[1], [1, 2], [2], []]) | st.lists(st.integers(-2, 2**33), max_size=20) | json_values,
    "token": st.sampled_from([TOKEN, "", "wrong"]) | texts | st.text(min_size=1000, max_size=1100) | json_values,
    "max_frame": st.sampled_from([wire.MIN_MAX_FRAME, wire.MIN_MAX_FRAME - 1, wire.MAX_U32, wire.MAX_U32 + 1])
    | json_values,
    "resume": st.just(GOOD_RESUME)
    | st.fixed_dictionaries({"session": texts | json_values, "secret": texts | json_values})
    | json_values,
}
# mostly a valid HELLO with a field or two replaced, else only some fields; plus any keys
hello_bodies = st.tuples(
    st.sampled_from([True, True, True, False]),
    st.fixed_dictionaries({}, optional=field_values).filter(lambda d: len(d) <= 2)
    | st.fixed_dictionaries({}, optional=field_values),
    st.dictionaries(texts, json_values, max_size=2),
).map(lambda t: ({**good_hello(), **t[1]} if t[0] else t[1]) | t[2])
any_frames = st.builds(
    lambda ftype, flags, stream_id, body: wire.HEADER.pack(ftype, flags, stream_id, len(body)) + body,
    st.sampled_from(list(FrameType)) | st.integers(0, 255),
    st.integers(0, 255) | st.just(0),
    st.just(0) | st.integers(0, wire.MAX_U32),
    st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()),
)
handshake_inputs = (
    hello_bodies.map(hello_frame)
    | json_values.map(lambda v: wire.encode(FrameType.HELLO, 0, json.dumps(v).encode()))
    | any_frames
    | st.binary(max_size=80)
    | st.tuples(hello_bodies.map(hello_frame), st.binary(max_size=40)).map(b"".join)
)


class HandshakeFuzzTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.state_dir = Path(tempfile.mkdtemp(prefix="rtunnel-handshake-"))
        self.addCleanup(shutil.rmtree, self.state_dir, True)
        self.logs = LogCapture(self)

    @FUZZ_SETTINGS
    @given(handshake_inputs)
    # found by the fuzz: bad bytes after a refused HELLO were counted as a second failure
    @example(wire.encode_json(FrameType.HELLO, {"protocol": "rtunnel", "versions": [2], "token": "t"}) + bytes(10))
    def test_any_handshake_ends_in_error_welcome_or_the_deadline_and_never_a_traceback(self, data: bytes) -> None:
        self.logs.events.clear()
        bench = Bench(self.state_dir)
        try:
            frames, link, transport = bench.attempt(data)
        finally:
            bench.close()
        self.assertEqual(self.logs.failures(), [], data)
        guard = bench.server.guard
        self.assertTrue(transport.disconnecting or link.session is not None, data)
        if not frames:
            # nothing complete arrived: the deadline dropped it, uncounted
            self.assertTrue(any(e.get("event") == "handshake_timeout" for e in self.logs.events), data)
            self.assertFalse(complete_frames(data), data)
            self.assertEqual(guard.failures, 0)
        elif frames[0].type is FrameType.WELCOME:
            self.assertEqual(guard.failures, 0)
            self.assertEqual(len(bench.server.sessions), 0)  # closed by bench.close
        else:
            self.assertEqual([f.type for f in frames], [FrameType.ERROR], data)
            code, reason = wire.decode_coded(frames[0])
            self.assertNotEqual(code, ErrorCode.INTERNAL, reason)
            self.assertTrue(reason, data)
            self.assertEqual(guard.failures, 1, (data, reason))
        self.assertEqual(guard.unauthenticated, 0)
