"""docs/protocol.md's tables say what rtunnel.wire and rtunnel.mux do: frame
types, which are reliable, which carry a stream id, body sizes, the RST and
ERROR codes, and the constants a peer must share (header, windows, frame
sizes). A third party implements from these tables."""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial import unittest

from rtunnel import wire
from rtunnel.mux import SessionSettings
from rtunnel.wire import ErrorCode, FrameType, ResetCode

DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()


def table_rows(heading: str, first_column: str) -> list[list[str]]:
    """The rows (cells stripped) of the first table after `heading` whose
    header row starts with `first_column`."""
    section = DOC[DOC.index(heading):]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"\|\s*{first_column}\s*\|", line))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


class ProtocolDocTests(unittest.TestCase):
    def assertInDoc(self, text: str) -> None:
        self.assertTrue(text in DOC, f"docs/protocol.md does not say {text!r}")

    def test_frame_table_matches_the_codec(self):
        rows = table_rows("## Frames", "type")
        self.assertEqual([int(r[0]) for r in rows], [t.value for t in FrameType])
        for number, name, direction, stream, reliable, body in rows:
            ftype = FrameType(int(number))
            self.assertEqual(name, ftype.name)
            self.assertIn(direction, ("both", "S → C", "C → S"))
            self.assertEqual(stream == "≠ 0", ftype in wire.STREAM_FRAMES, name)
            self.assertEqual(reliable == "yes", ftype in wire.RELIABLE, name)
            exact = wire._EXACT_SIZE.get(ftype)
            if exact is not None:
                self.assertIn(f"({exact} bytes)", body, name)
            minimum = wire._MIN_SIZE.get(ftype, 0)
            if minimum > 2 and ftype is not FrameType.DATA:
                self.assertIn(f"≥ {minimum} bytes", body, name)

    def test_clients_open_no_streams_and_servers_bind_nothing(self):
        rows = {r[1]: r[2] for r in table_rows("## Frames", "type")}
        self.assertEqual(rows["OPEN"], "S → C")
        self.assertEqual({n for n, d in rows.items() if d == "C → S"}, {"HELLO", "BIND", "UNBIND"})

    def test_rst_codes_match(self):
        rows = table_rows("### FIN, RST", "code")
        self.assertEqual({int(r[0]): r[1].strip("`") for r in rows}, {c.value: c.name.lower() for c in ResetCode})

    def test_error_codes_match(self):
        rows = table_rows("## GOAWAY and ERROR", "code")
        self.assertEqual({int(r[0]): r[1].strip("`") for r in rows}, {c.value: c.name.lower() for c in ErrorCode})

    def test_constants_match(self):
        settings = SessionSettings()
        self.assertEqual(wire.HEADER_SIZE, 10)
        self.assertInDoc("Every frame is a 10-byte header")
        self.assertInDoc(f"| {wire.HANDSHAKE_MAX_FRAME:,} bytes".replace(",", " "))
        self.assertEqual(settings.initial_window, 262144)
        self.assertInDoc("262 144 bytes (256 KiB), not negotiated")
        self.assertInDoc("| 1 048 576 / 16 384 / 2³²−1 |")
        self.assertEqual((wire.DEFAULT_MAX_FRAME, wire.MIN_MAX_FRAME, wire.MAX_U32), (1048576, 16384, 2**32 - 1))
        self.assertEqual(settings.ack_every, 32)
        self.assertLessEqual(settings.ack_delay, 1.0)
        self.assertEqual(wire.MAX_REASON, 1024)
        self.assertEqual((wire.SESSION_ID_HEX, wire.SESSION_SECRET_HEX), (32, 64))
        self.assertInDoc("| session id / secret | 32 / 64 lower-case hex digits |")
        self.assertEqual(settings.max_stream_window, 64 << 20)
        self.assertEqual(settings.session_window_budget, 128 << 20)
        self.assertInDoc("default 64 MiB")
        self.assertInDoc("default 128 MiB")

    def test_doc_is_normative_and_keeps_the_limits_section(self):
        for word in ("MUST", "MUST NOT", "SHOULD", "MAY", "RFC 2119"):
            self.assertInDoc(word)
        self.assertInDoc("## Limits a peer must respect")

    def test_datagram_section_says_what_the_codec_does(self):
        """The DATAGRAM layout a third party implements ("Datagrams") is the
        codec's: head, address flag, the largest head a sender allows for."""
        self.assertInDoc("DATAGRAM body: tunnel: u32, flow: u32,")
        self.assertInDoc("[flag 0x01: family: u8 (4 or 6), address: 4 or 16 bytes, port: u16]")
        self.assertEqual(wire.FLAG_ADDRESS, 0x01)
        self.assertEqual(wire._MIN_SIZE[FrameType.DATAGRAM], 8)
        self.assertInDoc(f"`max_frame − {wire.DATAGRAM_OVERHEAD}`")
        self.assertInDoc(f"at most {wire.MAX_UDP_PAYLOAD:,}".replace(",", " "))
        self.assertNotIn(FrameType.DATAGRAM, wire.RELIABLE)
        frame = wire.encode_datagram(7, 9, b"hi", ("192.0.2.1", 53))
        body = frame[wire.HEADER_SIZE:]
        self.assertEqual(body, bytes.fromhex("00000007" "00000009" "04" "c0000201" "0035") + b"hi")
