"""Tests for rtunnel.wire, the pure frame codec (see docs/protocol.md, "Frames")."""

from __future__ import annotations

import ipaddress
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from rtunnel import wire
from rtunnel.wire import (
    DEFAULT_MAX_FRAME,
    FLAG_PONG,
    HANDSHAKE_MAX_FRAME,
    HEADER_SIZE,
    JSON_FRAMES,
    MAX_U32,
    MAX_U64,
    MIN_MAX_FRAME,
    STREAM_FRAMES,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    ResumeEntry,
    ResumeState,
)

# ---------------------------------------------------------------- strategies

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, MAX_U32)
u64 = st.integers(0, MAX_U64)
stream_ids = st.integers(1, MAX_U32)
payloads = st.binary(min_size=1, max_size=2048)

SESSION_FRAMES = sorted(set(FrameType) - STREAM_FRAMES)
UNKNOWN_TYPES = [t for t in range(256) if t not in {int(f) for f in FrameType}]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 64), 1 << 64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=15), json_values, max_size=6)


def _reason_fits(reason: str) -> bool:
    return len(reason.encode()) <= 1024


reasons = st.text(max_size=200).filter(_reason_fits)

resume_entries = st.builds(ResumeEntry, u32, u64, u64)
resume_states = st.builds(ResumeState, u64, st.lists(resume_entries, max_size=40).map(tuple))


def _expected(encoded: bytes, ftype: FrameType, stream_id: int, flags: int = 0) -> tuple[bytes, Frame]:
    """Pair an encoded frame with the Frame a decoder must yield for it."""
    return encoded, Frame(ftype, flags, stream_id, encoded[HEADER_SIZE:])


@st.composite
def encoded_frames(draw: st.DrawFn) -> tuple[bytes, Frame]:
    """Any valid frame, built with one of the encoders, and its expected Frame."""
    kind = draw(st.sampled_from(["data", "json", "window", "open", "fin", "coded", "ping", "ack", "resume"]))
    if kind == "data":
        sid = draw(stream_ids)
        return _expected(wire.encode(FrameType.DATA, sid, draw(payloads)), FrameType.DATA, sid)
    if kind == "json":
        ftype = draw(st.sampled_from(sorted(JSON_FRAMES)))
        return _expected(wire.encode_json(ftype, draw(json_objects)), ftype, 0)
    if kind == "window":
        sid = draw(stream_ids)
        return _expected(wire.encode_window(sid, draw(u64), draw(u32)), FrameType.WINDOW, sid)
    if kind == "open":
        sid = draw(stream_ids)
        return _expected(wire.encode_open(sid, draw(u32), draw(json_objects)), FrameType.OPEN, sid)
    if kind == "fin":
        sid = draw(stream_ids)
        return _expected(wire.encode_fin(sid, draw(u64)), FrameType.FIN, sid)
    if kind == "coded":
        ftype = draw(st.sampled_from([FrameType.RST, FrameType.GOAWAY, FrameType.ERROR]))
        sid = draw(stream_ids) if ftype is FrameType.RST else 0
        return _expected(wire.encode_coded(ftype, sid, draw(u16), draw(reasons)), ftype, sid)
    if kind == "ping":
        pong = draw(st.booleans())
        return _expected(wire.encode_ping(draw(u64), pong), FrameType.PING, 0, FLAG_PONG if pong else 0)
    if kind == "ack":
        return _expected(wire.encode_ack(draw(u64)), FrameType.ACK, 0)
    return _expected(wire.encode_resume(draw(resume_states)), FrameType.RESUME, 0)


frame_sequences = st.lists(encoded_frames(), min_size=1, max_size=12)


@st.composite
def chunked(draw: st.DrawFn, data: bytes, max_chunk: int = 64) -> list[bytes]:
    """Split data at random points into chunks of 1 .. max_chunk bytes."""
    chunks, pos = [], 0
    while pos < len(data):
        size = draw(st.integers(1, max_chunk))
        chunks.append(data[pos : pos + size])
        pos += size
    return chunks


@st.composite
def byte_soup(draw: st.DrawFn) -> bytes:
    """Bytes that are partly garbage, partly frames, partly plausible headers."""
    pieces = draw(
        st.lists(
            st.one_of(
                st.binary(max_size=64),
                encoded_frames().map(lambda pair: pair[0]),
                st.builds(
                    lambda t, f, s, n, body: wire.HEADER.pack(t, f, s, n) + body,
                    st.integers(0, 20),
                    st.sampled_from([0, 0, 1, 2, 0x80, 0xFF]),
                    st.sampled_from([0, 0, 1, 5, MAX_U32]),
                    st.integers(0, 80) | st.sampled_from([MAX_U32, HANDSHAKE_MAX_FRAME + 1]),
                    st.binary(max_size=80),
                ),
            ),
            max_size=10,
        )
    )
    return b"".join(pieces)


# ---------------------------------------------------------------- helpers


def decode_one(data: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> Frame:
    """Decode exactly one whole frame, checking nothing is left over."""
    decoder = FrameDecoder(max_frame)
    frames = list(decoder.feed(data))
    assert len(frames) == 1, frames
    assert decoder.buffered == 0, decoder.buffered
    return frames[0]


def header_error(
    ftype: int, stream_id: int, length: int, flags: int = 0, max_frame: int = DEFAULT_MAX_FRAME
) -> str:
    """Feed only a 10-byte header and return the FrameError message it raises."""
    decoder = FrameDecoder(max_frame)
    try:
        list(decoder.feed(wire.HEADER.pack(ftype, flags, stream_id, length)))
    except FrameError as e:
        return str(e)
    raise AssertionError(f"header type={ftype} flags={flags} id={stream_id} length={length} was accepted")


# ---------------------------------------------------------------- round trips


class RoundTripTests(SynchronousTestCase):
    """Every encoder's output decodes back to the same fields."""

    @SETTINGS
    @given(stream_ids, payloads)
    def test_data_frame_round_trips_stream_id_and_raw_payload(self, sid: int, payload: bytes) -> None:
        frame = decode_one(wire.encode(FrameType.DATA, sid, payload))
        self.assertEqual(frame, Frame(FrameType.DATA, 0, sid, payload))
        self.assertIsInstance(frame.body, bytes)

    @SETTINGS
    @given(st.sampled_from(sorted(JSON_FRAMES)), json_objects)
    def test_json_frames_round_trip_their_object_on_stream_zero(self, ftype: FrameType, obj: dict) -> None:
        frame = decode_one(wire.encode_json(ftype, obj))
        self.assertEqual((frame.type, frame.flags, frame.stream_id), (ftype, 0, 0))
        self.assertEqual(wire.decode_json(frame), obj)

    @SETTINGS
    @given(stream_ids, u64, u32)
    def test_window_round_trips_consumed_and_window(self, sid: int, consumed: int, window: int) -> None:
        frame = decode_one(wire.encode_window(sid, consumed, window))
        self.assertEqual((frame.type, frame.stream_id), (FrameType.WINDOW, sid))
        self.assertEqual(wire.decode_window(frame), (consumed, window))

    @SETTINGS
    @given(stream_ids, u32, json_objects)
    def test_open_round_trips_tunnel_id_and_info(self, sid: int, tunnel: int, info: dict) -> None:
        frame = decode_one(wire.encode_open(sid, tunnel, info))
        self.assertEqual((frame.type, frame.stream_id), (FrameType.OPEN, sid))
        self.assertEqual(wire.decode_open(frame), (tunnel, info))

    @SETTINGS
    @given(stream_ids, u64)
    def test_fin_round_trips_final_offset(self, sid: int, final_offset: int) -> None:
        frame = decode_one(wire.encode_fin(sid, final_offset))
        self.assertEqual((frame.type, frame.stream_id), (FrameType.FIN, sid))
        self.assertEqual(wire.decode_u64(frame), final_offset)

    @SETTINGS
    @given(stream_ids, u16, reasons)
    def test_rst_round_trips_code_and_unicode_reason(self, sid: int, code: int, reason: str) -> None:
        frame = decode_one(wire.encode_coded(FrameType.RST, sid, code, reason))
        self.assertEqual((frame.type, frame.stream_id), (FrameType.RST, sid))
        self.assertEqual(wire.decode_coded(frame), (code, reason))

    @SETTINGS
    @given(st.sampled_from([FrameType.GOAWAY, FrameType.ERROR]), u16, reasons)
    def test_goaway_and_error_round_trip_code_and_unicode_reason(
        self, ftype: FrameType, code: int, reason: str
    ) -> None:
        frame = decode_one(wire.encode_coded(ftype, 0, code, reason))
        self.assertEqual((frame.type, frame.stream_id), (ftype, 0))
        self.assertEqual(wire.decode_coded(frame), (code, reason))

    def test_coded_reason_is_cut_to_1024_bytes(self) -> None:
        frame = decode_one(wire.encode_coded(FrameType.ERROR, 0, 5, "x" * 5000))
        self.assertEqual(len(frame.body), 2 + 1024)
        self.assertEqual(wire.decode_coded(frame), (5, "x" * 1024))

    @SETTINGS
    @given(st.text(alphabet="é€😀", min_size=300, max_size=600))
    def test_coded_reason_cut_to_1024_bytes_is_still_valid_utf8(self, reason: str) -> None:
        frame = decode_one(wire.encode_coded(FrameType.ERROR, 0, 1, reason))
        self.assertLessEqual(len(frame.body), 2 + 1024)
        text = bytes(frame.body[2:]).decode("utf-8")  # strict: the spec says "UTF-8 reason"
        self.assertTrue(reason.startswith(text))


    @SETTINGS
    @given(u64, st.booleans())
    def test_ping_round_trips_opaque_and_pong_flag(self, opaque: int, pong: bool) -> None:
        frame = decode_one(wire.encode_ping(opaque, pong))
        self.assertEqual((frame.type, frame.stream_id), (FrameType.PING, 0))
        self.assertEqual(frame.flags, FLAG_PONG if pong else 0)
        self.assertEqual(wire.decode_u64(frame), opaque)

    def test_ping_without_pong_argument_is_not_a_pong(self) -> None:
        self.assertEqual(decode_one(wire.encode_ping(7)).flags, 0)

    @SETTINGS
    @given(u64)
    def test_ack_round_trips_received_count(self, received: int) -> None:
        frame = decode_one(wire.encode_ack(received))
        self.assertEqual((frame.type, frame.flags, frame.stream_id), (FrameType.ACK, 0, 0))
        self.assertEqual(wire.decode_u64(frame), received)

    @SETTINGS
    @given(resume_states)
    def test_resume_round_trips_reliable_count_and_stream_table(self, state: ResumeState) -> None:
        frame = decode_one(wire.encode_resume(state))
        self.assertEqual((frame.type, frame.flags, frame.stream_id), (FrameType.RESUME, 0, 0))
        self.assertEqual(len(frame.body), 12 + 20 * len(state.streams))
        self.assertEqual(wire.decode_resume(frame), state)

    @SETTINGS
    @given(encoded_frames())
    def test_every_encoder_output_decodes_to_its_header_fields_and_body(
        self, pair: tuple[bytes, Frame]
    ) -> None:
        encoded, expected = pair
        self.assertEqual(decode_one(encoded), expected)

    def test_body_of_exactly_max_frame_is_accepted(self) -> None:
        payload = bytes(range(256)) * (MIN_MAX_FRAME // 256)
        frame = decode_one(wire.encode(FrameType.DATA, 3, payload), max_frame=MIN_MAX_FRAME)
        self.assertEqual(frame.body, payload)

    def test_header_helper_matches_the_header_of_encode(self) -> None:
        encoded = wire.encode(FrameType.DATA, 9, b"abc")
        self.assertEqual(wire.header(FrameType.DATA, 9, 3), encoded[:HEADER_SIZE])
        self.assertEqual(
            wire.header(FrameType.PING, 0, 8, FLAG_PONG), wire.encode_ping(1, True)[:HEADER_SIZE]
        )


# ---------------------------------------------------------------- splitting


class SplitTests(SynchronousTestCase):
    """Where the bytes are cut does not change which frames come out."""

    def _feed_all(self, decoder: FrameDecoder, chunks: list[bytes]) -> list[Frame]:
        out: list[Frame] = []
        for chunk in chunks:
            out.extend(decoder.feed(chunk))
        return out

    @SETTINGS
    @given(frame_sequences, st.data())
    def test_frames_fed_in_random_chunks_come_out_identical_and_in_order(
        self, pairs: list[tuple[bytes, Frame]], data: st.DataObject
    ) -> None:
        stream = b"".join(encoded for encoded, _ in pairs)
        chunks = data.draw(chunked(stream, max_chunk=data.draw(st.sampled_from([1, 3, 11, 64, 4096]))))
        decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        self.assertEqual(self._feed_all(decoder, chunks), [frame for _, frame in pairs])
        self.assertEqual(decoder.buffered, 0)

    @SETTINGS
    @given(frame_sequences, st.data())
    def test_bodies_are_bytes_whatever_buffer_type_is_fed(
        self, pairs: list[tuple[bytes, Frame]], data: st.DataObject
    ) -> None:
        stream = b"".join(encoded for encoded, _ in pairs)
        chunks = data.draw(chunked(stream, max_chunk=data.draw(st.sampled_from([5, 64, 4096]))))
        kinds = [bytes, bytearray]
        decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        out = self._feed_all(decoder, [data.draw(st.sampled_from(kinds))(c) for c in chunks])
        self.assertEqual(out, [frame for _, frame in pairs])
        self.assertTrue(all(type(frame.body) is bytes for frame in out))

    @FEW
    @given(st.lists(encoded_frames(), min_size=1, max_size=4))
    def test_frames_fed_one_byte_at_a_time_come_out_identical_and_in_order(
        self, pairs: list[tuple[bytes, Frame]]
    ) -> None:
        stream = b"".join(encoded for encoded, _ in pairs)
        decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        out = self._feed_all(decoder, [stream[i : i + 1] for i in range(len(stream))])
        self.assertEqual(out, [frame for _, frame in pairs])
        self.assertEqual(decoder.buffered, 0)

    @SETTINGS
    @given(frame_sequences)
    def test_frames_fed_all_at_once_come_out_in_one_feed(self, pairs: list[tuple[bytes, Frame]]) -> None:
        decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        self.assertEqual(list(decoder.feed(b"".join(e for e, _ in pairs))), [f for _, f in pairs])
        self.assertEqual(decoder.buffered, 0)

    def test_empty_feed_yields_nothing(self) -> None:
        decoder = FrameDecoder()
        self.assertEqual(list(decoder.feed(b"")), [])
        self.assertEqual(decoder.buffered, 0)


# ---------------------------------------------------------------- truncation


class TruncationTests(SynchronousTestCase):
    @SETTINGS
    @given(encoded_frames())
    def test_frame_missing_its_last_byte_yields_nothing_and_stays_buffered(
        self, pair: tuple[bytes, Frame]
    ) -> None:
        encoded, expected = pair
        decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        self.assertEqual(list(decoder.feed(encoded[:-1])), [])
        self.assertEqual(decoder.buffered, len(encoded) - 1)
        self.assertEqual(list(decoder.feed(encoded[-1:])), [expected])
        self.assertEqual(decoder.buffered, 0)

    @SETTINGS
    @given(encoded_frames(), encoded_frames())
    def test_complete_frame_is_yielded_and_trailing_partial_frame_stays_buffered(
        self, first: tuple[bytes, Frame], second: tuple[bytes, Frame]
    ) -> None:
        decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        partial = second[0][: HEADER_SIZE - 1]
        self.assertEqual(list(decoder.feed(first[0] + partial)), [first[1]])
        self.assertEqual(decoder.buffered, len(partial))
        self.assertEqual(list(decoder.feed(second[0][len(partial) :])), [second[1]])


# ---------------------------------------------------------------- oversize


class OversizeTests(SynchronousTestCase):
    """A body longer than max_frame is refused from the header alone."""

    @SETTINGS
    @given(
        st.sampled_from(list(FrameType)),
        st.sampled_from([MIN_MAX_FRAME, HANDSHAKE_MAX_FRAME, DEFAULT_MAX_FRAME])
        | st.integers(0, MAX_U32 - 1),
        st.data(),
    )
    def test_oversize_header_raises_as_soon_as_the_header_is_complete(
        self, ftype: FrameType, max_frame: int, data: st.DataObject
    ) -> None:
        length = data.draw(st.integers(max_frame + 1, MAX_U32))
        sid = 0 if ftype not in STREAM_FRAMES else 1
        head = wire.header(ftype, sid, length)
        decoder = FrameDecoder(max_frame)
        for i in range(HEADER_SIZE - 1):
            self.assertEqual(list(decoder.feed(head[i : i + 1])), [])
        with self.assertRaises(FrameError) as cm:
            list(decoder.feed(head[-1:]))
        message = str(cm.exception)
        self.assertIn(ftype.name, message)
        self.assertIn(str(max_frame), message)
        self.assertIn(str(length), message)

    def test_oversize_check_uses_the_handshake_limit_by_default(self) -> None:
        message = header_error(FrameType.HELLO, 0, HANDSHAKE_MAX_FRAME + 1, max_frame=HANDSHAKE_MAX_FRAME)
        self.assertIn("HELLO", message)
        self.assertIn(str(HANDSHAKE_MAX_FRAME), message)
        with self.assertRaises(FrameError):
            list(FrameDecoder().feed(wire.header(FrameType.HELLO, 0, HANDSHAKE_MAX_FRAME + 1)))

    def test_frames_before_an_oversize_header_are_still_yielded(self) -> None:
        decoder = FrameDecoder(MIN_MAX_FRAME)
        got: list[Frame] = []
        with self.assertRaises(FrameError):
            for frame in decoder.feed(wire.encode_ack(1) + wire.header(FrameType.DATA, 2, MIN_MAX_FRAME + 1)):
                got.append(frame)
        self.assertEqual(got, [Frame(FrameType.ACK, 0, 0, (1).to_bytes(8, "big"))])

    def test_raising_max_frame_after_the_handshake_admits_larger_frames(self) -> None:
        decoder = FrameDecoder(HANDSHAKE_MAX_FRAME)
        payload = b"z" * (HANDSHAKE_MAX_FRAME + 1)
        decoder.max_frame = DEFAULT_MAX_FRAME
        self.assertEqual(
            list(decoder.feed(wire.encode(FrameType.DATA, 2, payload))),
            [Frame(FrameType.DATA, 0, 2, payload)],
        )

    def test_decoder_keeps_failing_after_a_frame_error(self) -> None:
        decoder = FrameDecoder(MIN_MAX_FRAME)
        bad = wire.header(FrameType.DATA, 2, MIN_MAX_FRAME + 1)
        with self.assertRaises(FrameError):
            list(decoder.feed(bad))
        with self.assertRaises(FrameError):
            list(decoder.feed(wire.encode_ack(1)))


# ---------------------------------------------------------------- invalid headers


class InvalidHeaderTests(SynchronousTestCase):
    def test_every_unknown_type_byte_raises_naming_the_type(self) -> None:
        self.assertEqual(len(UNKNOWN_TYPES), 256 - len(FrameType))
        for raw in UNKNOWN_TYPES:
            message = header_error(raw, 0, 0)
            self.assertIn(str(raw), message, f"type {raw}")
            self.assertIn("unknown frame type", message)

    def test_unknown_type_is_refused_even_with_a_body_present(self) -> None:
        with self.assertRaises(FrameError):
            list(FrameDecoder().feed(bytes([16, 0, 0, 0, 0, 1, 0, 0, 0, 1]) + b"x"))

    def test_stream_frames_on_stream_zero_raise(self) -> None:
        sizes = {
            FrameType.DATA: 1,
            FrameType.WINDOW: 12,
            FrameType.OPEN: 6,
            FrameType.FIN: 8,
            FrameType.RST: 2,
        }
        self.assertEqual(set(sizes), STREAM_FRAMES)
        for ftype, size in sizes.items():
            message = header_error(ftype, 0, size)
            self.assertIn(ftype.name, message)
            self.assertIn("stream id", message)

    def test_data_on_stream_zero_raises(self) -> None:
        with self.assertRaises(FrameError):
            list(FrameDecoder().feed(wire.encode(FrameType.DATA, 0, b"payload")))

    def test_ping_on_stream_five_raises(self) -> None:
        with self.assertRaises(FrameError) as cm:
            list(FrameDecoder().feed(wire.encode(FrameType.PING, 5, bytes(8))))
        self.assertIn("PING", str(cm.exception))
        self.assertIn("5", str(cm.exception))

    @SETTINGS
    @given(st.sampled_from(SESSION_FRAMES), stream_ids)
    def test_session_frames_on_a_nonzero_stream_raise(self, ftype: FrameType, sid: int) -> None:
        message = header_error(ftype, sid, 12)
        self.assertIn(ftype.name, message)
        self.assertIn(str(sid), message)

    def test_window_with_11_bytes_raises(self) -> None:
        with self.assertRaises(FrameError) as cm:
            list(FrameDecoder().feed(wire.encode(FrameType.WINDOW, 1, bytes(11))))
        self.assertIn("WINDOW", str(cm.exception))
        self.assertIn("12", str(cm.exception))

    def test_fixed_size_bodies_of_any_other_size_raise_from_the_header_alone(self) -> None:
        cases = {FrameType.WINDOW: 12, FrameType.FIN: 8, FrameType.PING: 8, FrameType.ACK: 8}
        for ftype, exact in cases.items():
            sid = 1 if ftype in STREAM_FRAMES else 0
            for length in (0, 1, exact - 1, exact + 1, exact * 2):
                message = header_error(ftype, sid, length)
                self.assertIn(ftype.name, message, (ftype, length))
                self.assertIn(str(exact), message, (ftype, length))

    def test_too_short_bodies_raise(self) -> None:
        minimum = {
            FrameType.DATA: 1,
            FrameType.OPEN: 6,
            FrameType.RST: 2,
            FrameType.GOAWAY: 2,
            FrameType.ERROR: 2,
            FrameType.RESUME: 12,
            **dict.fromkeys(JSON_FRAMES, 2),
        }
        for ftype, size in minimum.items():
            sid = 1 if ftype in STREAM_FRAMES else 0
            for length in range(size):
                with self.assertRaises(FrameError, msg=f"{ftype.name} length {length}"):
                    list(FrameDecoder().feed(wire.encode(ftype, sid, b"{" * length)))
            # the minimum itself passes the header check (JSON validity is decode_json's job)
            self.assertEqual(len(list(FrameDecoder().feed(wire.encode(ftype, sid, b"{" * size)))), 1)

    def test_unknown_flags_raise_on_every_type(self) -> None:
        for ftype in FrameType:
            sid = 1 if ftype in STREAM_FRAMES else 0
            for flags in range(1, 256):
                if ftype in (FrameType.PING, FrameType.DATAGRAM) and flags == 0x01:  # PONG, ADDRESS
                    continue
                message = header_error(ftype, sid, 12 if ftype is FrameType.WINDOW else 8, flags=flags)
                self.assertIn(ftype.name, message)
                self.assertIn(f"0x{flags:02x}", message)

    def test_pong_flag_is_only_valid_on_ping(self) -> None:
        self.assertEqual(decode_one(wire.encode_ping(1, pong=True)).flags, FLAG_PONG)
        with self.assertRaises(FrameError):
            list(FrameDecoder().feed(wire.encode(FrameType.ACK, 0, bytes(8), flags=FLAG_PONG)))


# ---------------------------------------------------------------- datagrams

ipv4_hosts = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
ipv6_hosts = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1)).filter(
    lambda h: ipaddress.IPv6Address(h).ipv4_mapped is None
)
addresses = st.none() | st.tuples(ipv4_hosts | ipv6_hosts, u16)


class DatagramTests(SynchronousTestCase):
    """DATAGRAM (docs/protocol.md "Datagrams"): tunnel, flow, the optional
    address block, and a payload of 0 bytes or more."""

    @SETTINGS
    @given(u32, u32, addresses, st.binary(max_size=3000))
    def test_datagram_round_trips_tunnel_flow_address_and_payload(
        self, tunnel: int, flow: int, address: tuple[str, int] | None, payload: bytes,
    ) -> None:
        frame = decode_one(wire.encode_datagram(tunnel, flow, payload, address))
        self.assertEqual(frame.flags, wire.FLAG_ADDRESS if address else 0)
        self.assertEqual(wire.decode_datagram(frame), wire.Datagram(tunnel, flow, address, payload))

    @SETTINGS
    @given(u32, u32, addresses, st.binary(max_size=300), st.data())
    def test_datagrams_cut_anywhere_decode_the_same(
        self, tunnel: int, flow: int, address: tuple[str, int] | None, payload: bytes, data: st.DataObject,
    ) -> None:
        frames = wire.encode_datagram(tunnel, flow, payload, address) * 3
        decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        got = [
            wire.decode_datagram(f)
            for chunk in data.draw(chunked(frames, max_chunk=data.draw(st.sampled_from([1, 5, 40]))))
            for f in decoder.feed(chunk)
        ]
        self.assertEqual(got, [wire.Datagram(tunnel, flow, address, payload)] * 3)

    def test_an_ipv4_mapped_visitor_is_sent_as_ipv4(self) -> None:
        frame = decode_one(wire.encode_datagram(1, 2, b"x", ("::ffff:198.51.100.7", 53)))
        self.assertEqual(wire.decode_datagram(frame).address, ("198.51.100.7", 53))

    def test_the_header_and_payload_are_written_apart(self) -> None:
        header = wire.datagram_header(3, 4, 5, ("2001:db8::1", 4000))
        self.assertEqual(len(header), HEADER_SIZE + wire.DATAGRAM_OVERHEAD)
        self.assertEqual(wire.decode_datagram(decode_one(header + b"hello")).payload, b"hello")

    def test_a_body_shorter_than_tunnel_and_flow_is_refused_from_the_header(self) -> None:
        self.assertIn("at least 8 bytes", header_error(FrameType.DATAGRAM, 0, 7))

    def test_a_datagram_on_a_stream_id_is_refused(self) -> None:
        self.assertIn("stream id 0", header_error(FrameType.DATAGRAM, 2, 8))

    def test_a_bad_address_block_is_a_frame_error(self) -> None:
        for block in (b"", b"\x05" + bytes(6), b"\x04\x01\x02", b"\x06" + bytes(17)):
            frame = Frame(FrameType.DATAGRAM, wire.FLAG_ADDRESS, 0, bytes(8) + block)
            with self.assertRaises(FrameError):
                wire.decode_datagram(frame)

    def test_the_largest_payload_leaves_room_for_the_largest_head(self) -> None:
        self.assertEqual(wire.max_datagram_payload(MIN_MAX_FRAME), MIN_MAX_FRAME - wire.DATAGRAM_OVERHEAD)
        self.assertEqual(wire.max_datagram_payload(DEFAULT_MAX_FRAME), 65507)
        frame = wire.encode_datagram(1, 1, bytes(wire.max_datagram_payload(MIN_MAX_FRAME)), ("::1", 1))
        self.assertEqual(len(decode_one(frame, MIN_MAX_FRAME).body), MIN_MAX_FRAME)


# ---------------------------------------------------------------- body decoders


def _json_frame(body: bytes, ftype: FrameType = FrameType.HELLO) -> Frame:
    return decode_one(wire.encode(ftype, 0, body))


class JsonBodyTests(SynchronousTestCase):
    MALFORMED = [b"{", b"{'a': 1}", b'{"a":}', b"{}x", b"\xff\xfe{}", b'{"a":"\xc3"}', b"  ", b"NaN!"]
    NOT_OBJECTS = [b"[]", b"[1,2]", b"12", b'"ab"', b"null", b"true", b"1.5e3"]

    def test_malformed_json_body_raises_frame_error_naming_the_type(self) -> None:
        for body in self.MALFORMED:
            with self.assertRaises(FrameError, msg=repr(body)) as cm:
                wire.decode_json(_json_frame(body, FrameType.BIND))
            self.assertIn("BIND", str(cm.exception))

    def test_json_that_is_not_an_object_raises_frame_error(self) -> None:
        for body in self.NOT_OBJECTS:
            with self.assertRaises(FrameError, msg=repr(body)) as cm:
                wire.decode_json(_json_frame(body, FrameType.WELCOME))
            self.assertIn("object", str(cm.exception))

    def test_open_with_malformed_or_non_object_info_raises_frame_error(self) -> None:
        for info in self.MALFORMED + self.NOT_OBJECTS:
            frame = decode_one(wire.encode(FrameType.OPEN, 2, b"\x00\x00\x00\x01" + info.ljust(2)))
            with self.assertRaises(FrameError, msg=repr(info)):
                wire.decode_open(frame)

    def test_json_with_too_many_digits_raises_frame_error(self) -> None:
        with self.assertRaises(FrameError):
            wire.decode_json(_json_frame(b'{"n": ' + b"9" * 5000 + b"}"))

    def test_deeply_nested_json_raises_frame_error(self) -> None:
        body = b"[" * (HANDSHAKE_MAX_FRAME - 1)  # fits in one handshake-time HELLO
        with self.assertRaises(FrameError):
            wire.decode_json(_json_frame(body))


    @SETTINGS
    @given(
        st.binary(min_size=2, max_size=200)
        | json_values.map(lambda v: json.dumps(v).encode()).filter(lambda b: len(b) >= 2)
    )
    def test_decode_json_returns_a_dict_or_raises_frame_error(self, body: bytes) -> None:
        try:
            obj = wire.decode_json(_json_frame(body))
        except FrameError:
            return
        self.assertIsInstance(obj, dict)


class ResumeBodyTests(SynchronousTestCase):
    @SETTINGS
    @given(resume_states, st.integers(-5, 5).filter(bool))
    def test_resume_whose_count_disagrees_with_its_length_raises(
        self, state: ResumeState, delta: int
    ) -> None:
        body = wire.encode_resume(state)[HEADER_SIZE:]
        count = len(state.streams) + delta
        if not 0 <= count <= MAX_U32:
            count = MAX_U32
        body = body[:8] + count.to_bytes(4, "big") + body[12:]
        with self.assertRaises(FrameError) as cm:
            wire.decode_resume(decode_one(wire.encode(FrameType.RESUME, 0, body)))
        self.assertIn(str(count), str(cm.exception))

    @SETTINGS
    @given(resume_states, st.integers(1, 100))
    def test_resume_with_bytes_beyond_its_entries_raises(self, state: ResumeState, extra: int) -> None:
        encoded = wire.encode_resume(state)[HEADER_SIZE:] + b"\x00" * extra
        with self.assertRaises(FrameError):
            wire.decode_resume(decode_one(wire.encode(FrameType.RESUME, 0, encoded)))

    def test_resume_with_maximum_count_and_no_entries_raises(self) -> None:
        body = (0).to_bytes(8, "big") + MAX_U32.to_bytes(4, "big")
        with self.assertRaises(FrameError):
            wire.decode_resume(decode_one(wire.encode(FrameType.RESUME, 0, body)))

    def test_empty_resume_table_round_trips(self) -> None:
        state = ResumeState(0, ())
        self.assertEqual(wire.decode_resume(decode_one(wire.encode_resume(state))), state)


# ---------------------------------------------------------------- robustness


DECODERS = {
    FrameType.DATA: lambda f: f.body,
    FrameType.WINDOW: wire.decode_window,
    FrameType.OPEN: wire.decode_open,
    FrameType.FIN: wire.decode_u64,
    FrameType.RST: wire.decode_coded,
    FrameType.PING: wire.decode_u64,
    FrameType.ACK: wire.decode_u64,
    FrameType.RESUME: wire.decode_resume,
    FrameType.GOAWAY: wire.decode_coded,
    FrameType.ERROR: wire.decode_coded,
    FrameType.DATAGRAM: wire.decode_datagram,
    **dict.fromkeys(JSON_FRAMES, wire.decode_json),
}


class ArbitraryInputTests(SynchronousTestCase):
    """Whatever a peer sends, the codec fails only with FrameError and buffers a bounded amount."""

    def test_every_frame_type_has_a_body_decoder(self) -> None:
        self.assertEqual(set(DECODERS), set(FrameType))

    @settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        byte_soup() | st.binary(max_size=400),
        st.sampled_from([0, 1, 8, 12, 40, MIN_MAX_FRAME, HANDSHAKE_MAX_FRAME]),
        st.data(),
    )
    def test_random_bytes_raise_only_frame_error_and_buffer_a_bounded_amount(
        self, blob: bytes, max_frame: int, data: st.DataObject
    ) -> None:
        chunks = data.draw(chunked(blob, max_chunk=data.draw(st.sampled_from([1, 7, 50, 500]))))
        largest = max((len(c) for c in chunks), default=0)
        bound = max_frame + HEADER_SIZE + largest
        decoder = FrameDecoder(max_frame)
        for chunk in chunks:
            try:
                for frame in decoder.feed(chunk):
                    self.assertLessEqual(len(frame.body), max_frame)
                    DECODERS[frame.type](frame)  # only FrameError may escape here too
            except FrameError:
                self.assertLessEqual(decoder.buffered, bound)
                return
            self.assertLessEqual(decoder.buffered, bound)
            self.assertLess(decoder.buffered, HEADER_SIZE + max_frame)


class HelloTests(SynchronousTestCase):
    """HELLO is parsed into a typed wire.Hello; tests/test_handshake_fuzz.py
    covers each refusal through a real ServerLink."""

    def test_a_hello_round_trips_through_its_json(self) -> None:
        hello = wire.Hello((1, 2), "tok", 65536, wire.ResumeRequest("ab" * 16, "cd" * 32))
        self.assertEqual(wire.decode_hello(_hello_frame(hello.to_json())), hello)

    def test_absent_optional_fields_take_their_defaults(self) -> None:
        hello = wire.decode_hello(_hello_frame({"protocol": "rtunnel", "versions": [1]}))
        self.assertEqual(hello, wire.Hello((1,), None, wire.DEFAULT_MAX_FRAME, None))

    def test_the_clients_own_hello_is_valid(self) -> None:
        from rtunnel.client import TunnelClient
        from rtunnel.config import ClientConfig

        client = TunnelClient(None, ClientConfig("localhost", 1, (), "tok"), lambda _: None)
        hello = wire.decode_hello(_hello_frame(client.hello()))
        self.assertEqual((hello.token, hello.resume), ("tok", None))

    def test_a_lone_surrogate_in_the_token_is_a_handshake_error_naming_the_token(self) -> None:
        body = json.dumps({"protocol": "rtunnel", "versions": [1], "token": "x\ud800"}).encode()
        e = self.assertRaises(wire.HandshakeError, wire.decode_hello, Frame(FrameType.HELLO, 0, 0, body))
        self.assertIn("token", str(e))


def _hello_frame(body: dict) -> Frame:
    return Frame(FrameType.HELLO, 0, 0, json.dumps(body).encode())


class TunnelMessageTests(SynchronousTestCase):
    """BIND and UNBIND reach the server as typed wire.Bind / wire.Unbind;
    a field out of its rules is a FrameError naming the field (the link then
    ends with PROTOCOL_ERROR, as for any bad frame)."""

    def test_a_bind_round_trips_through_its_json(self) -> None:
        bind = wire.Bind(7, "::1", 4000)
        self.assertEqual(wire.Bind.parse(json.dumps(bind.to_json()).encode()), bind)
        self.assertEqual(wire.Unbind.parse(json.dumps(wire.Unbind(7).to_json()).encode()), wire.Unbind(7))

    def test_binds_of_every_kind_round_trip_and_a_tcp_bind_stays_what_older_servers_read(self) -> None:
        for bind in (wire.Bind(2, "", 5353, "udp"), wire.Bind(3, "", 0, "http", "myapp"),
                     wire.Bind(4, "", 0, "tls", "app.example.org")):
            self.assertEqual(wire.Bind.parse(json.dumps(bind.to_json()).encode()), bind)
        self.assertEqual(wire.Bind(1, "", 80).to_json(), {"tunnel": 1, "host": "", "port": 80})

    def test_a_bind_of_an_unknown_kind_parses_so_the_server_can_refuse_it(self) -> None:
        self.assertEqual(wire.Bind.parse(b'{"tunnel": 1, "kind": "sctp"}'), wire.Bind(1, "", 0, "sctp"))

    def test_a_bind_without_a_host_asks_for_the_servers_default_address(self) -> None:
        self.assertEqual(wire.Bind.parse(b'{"tunnel": 1, "port": 0}'), wire.Bind(1, "", 0))
        self.assertEqual(wire.Bind.parse(b'{"tunnel": 1, "host": null, "port": 80}'), wire.Bind(1, "", 80))

    def test_each_invalid_field_is_named_in_the_error(self) -> None:
        cases = {
            b'{"host": "", "port": 1}': "tunnel",
            b'{"tunnel": -1, "port": 1}': "tunnel",
            b'{"tunnel": 4294967296, "port": 1}': "tunnel",
            b'{"tunnel": true, "port": 1}': "tunnel",
            b'{"tunnel": 1, "port": 65536}': "port",
            b'{"tunnel": 1, "port": "80"}': "port",
            b'{"tunnel": 1}': "port",
            b'{"tunnel": 1, "host": 5, "port": 1}': "host",
            b'{"tunnel": 1, "kind": 3, "port": 1}': "kind",
            b'{"tunnel": 1, "kind": "", "port": 1}': "kind",
            b'{"tunnel": 1, "kind": "udp"}': "port",
            b'{"tunnel": 1, "kind": "http"}': "of kind",
            b'{"tunnel": 1, "kind": "tls", "hostname": 7}': "hostname",
        }
        for body, field in cases.items():
            e = self.assertRaises(wire.FrameError, wire.Bind.parse, body)
            self.assertIn(f"BIND {field}", str(e), body)
        e = self.assertRaises(wire.FrameError, wire.Unbind.parse, b'{"tunnel": 1.5}')
        self.assertIn("UNBIND tunnel", str(e))
        e = self.assertRaises(wire.FrameError, wire.Bind.parse, b"[1]")
        self.assertIn("JSON object", str(e))


class ServerAnswerTests(SynchronousTestCase):
    """WELCOME, BOUND and BIND_FAILED parse into typed values (what the
    client acts on), and a field of the wrong type or range is a FrameError
    that names it."""

    SESSION, SECRET = "0123456789abcdef" * 2, "fedcba9876543210" * 4

    def frame(self, ftype: FrameType, body: dict) -> Frame:
        return decode_one(wire.encode_json(ftype, body))

    def rejects(self, parse: object, ftype: FrameType, body: dict, field: str) -> None:
        with self.assertRaises(FrameError, msg=repr(body)) as cm:
            parse(self.frame(ftype, body))  # type: ignore[operator]
        self.assertIn(f"{ftype.name} {field} ", str(cm.exception))

    def test_welcome_round_trips_through_its_frame(self) -> None:
        welcome = wire.Welcome(self.SESSION, self.SECRET, True, 1, 65536)
        self.assertEqual(wire.Welcome.parse(decode_one(welcome.encode())), welcome)

    def test_welcome_without_optional_fields_takes_their_defaults(self) -> None:
        welcome = wire.Welcome.parse(self.frame(FrameType.WELCOME, {"session": self.SESSION, "secret": self.SECRET}))
        self.assertEqual(welcome, wire.Welcome(self.SESSION, self.SECRET, False, 1, DEFAULT_MAX_FRAME))

    def test_welcome_max_frame_above_u32_is_taken_as_u32(self) -> None:
        body = {"session": self.SESSION, "secret": self.SECRET, "max_frame": 1 << 40}
        self.assertEqual(wire.Welcome.parse(self.frame(FrameType.WELCOME, body)).max_frame, wire.MAX_U32)

    def test_welcome_with_a_bad_field_is_a_handshake_error_naming_it(self) -> None:
        good = {"session": self.SESSION, "secret": self.SECRET}
        bad = [
            ("session", None), ("session", 12), ("session", "ab" * 15), ("session", self.SESSION.upper()),
            ("secret", None), ("secret", self.SESSION), ("resumed", 1), ("resumed", "yes"),
            ("version", 0), ("version", True), ("version", 1.0),
            ("max_frame", MIN_MAX_FRAME - 1), ("max_frame", "1048576"), ("max_frame", True),
        ]
        for field, value in bad:
            body = {**good, field: value} if value is not None else {k: v for k, v in good.items() if k != field}
            with self.assertRaises(wire.HandshakeError, msg=repr(body)) as cm:
                wire.Welcome.parse(self.frame(FrameType.WELCOME, body))
            self.assertIn(f"WELCOME {field} ", str(cm.exception))

    def test_bound_round_trips_with_and_without_a_host(self) -> None:
        for bound in (wire.Bound(7, "::", 4000), wire.Bound(0, None, 65535), wire.Bound(wire.MAX_U32, "", 1)):
            self.assertEqual(wire.Bound.parse(self.frame(FrameType.BOUND, bound.to_json())), bound)

    def test_bound_with_a_bad_field_names_it(self) -> None:
        good = {"tunnel": 1, "host": "::", "port": 4000}
        for field, value in [
            ("tunnel", -1), ("tunnel", wire.MAX_U32 + 1), ("tunnel", "1"), ("tunnel", False),
            ("port", 65536), ("port", -1), ("port", "4000"), ("port", 4000.0),
            ("host", 7), ("host", ["::"]),
        ]:
            self.rejects(wire.Bound.parse, FrameType.BOUND, {**good, field: value}, field)
        for field in ("tunnel", "port"):
            self.rejects(wire.Bound.parse, FrameType.BOUND, {k: v for k, v in good.items() if k != field}, field)

    def test_bind_failed_round_trips(self) -> None:
        failed = wire.BindFailed(3, "in_use", "port 4000 is in use by another program")
        self.assertEqual(wire.BindFailed.parse(self.frame(FrameType.BIND_FAILED, failed.to_json())), failed)

    def test_bind_failed_without_code_or_message_is_an_unknown_code_without_a_reason(self) -> None:
        """An unknown code means "retry later" (docs/protocol.md): an absent
        one is read as the empty code, as before."""
        self.assertEqual(
            wire.BindFailed.parse(self.frame(FrameType.BIND_FAILED, {"tunnel": 3})), wire.BindFailed(3, "", "")
        )

    def test_bind_failed_with_a_bad_field_names_it(self) -> None:
        good = {"tunnel": 1, "code": "in_use", "message": "no"}
        for field, value in [("tunnel", -2), ("tunnel", 1.5), ("code", 4), ("code", None), ("message", ["no"])]:
            self.rejects(wire.BindFailed.parse, FrameType.BIND_FAILED, {**good, field: value}, field)
        self.rejects(wire.BindFailed.parse, FrameType.BIND_FAILED, {"code": "in_use"}, "tunnel")
