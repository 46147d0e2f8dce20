"""rtunnel.twisted_private: every private Twisted name rtunnel uses exists on
the installed Twisted, no other module uses one, and the dependency pin
keeps Twisted below its next major version."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from twisted.internet import ssl, tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.trial import unittest

import twisted
from rtunnel import twisted_private
from rtunnel.twisted_private import PRIVATE_NAMES

ROOT = Path(__file__).resolve().parent.parent

#: Modules still using a listed name directly, with the part of #13 that
#: owns them (the options part routes `_dispatch` through twisted_private).
NOT_YET_FENCED = {("_dispatch", "rtunnel/configfile.py"), ("_dispatch", "rtunnel/tap/__init__.py")}


def holder(where: str) -> object:
    """An object of the Twisted class that `where` names."""
    if where == "tcp":
        return tcp.Connection.__new__(tcp.Connection)  # class attributes and methods; no socket
    if where == "tls":  # connected: _appSendBuffer is made in makeConnection
        factory = TLSMemoryBIOFactory(ssl.CertificateOptions(), True, Factory.forProtocol(Protocol))
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        return protocol
    if where == "options":
        return usage.Options()  # _dispatch is made in __init__
    raise AssertionError(where)


class PrivateNamesTests(unittest.SynchronousTestCase):
    def test_every_private_name_exists_on_the_installed_twisted(self) -> None:
        missing = [
            f"{where}.{name}"
            for where, name in PRIVATE_NAMES
            if not hasattr(holder(where), name) and not (where == "tcp" and name in vars_of_a_tcp_connection())
        ]
        self.assertEqual(missing, [], f"Twisted {twisted.__version__} lacks these: rtunnel.twisted_private must change")

    def test_no_other_module_uses_a_private_twisted_name(self) -> None:
        names = {name for _, name in PRIVATE_NAMES}
        pattern = re.compile(r"\.(" + "|".join(sorted(names)) + r")\b")
        found = set()
        for path in sorted((ROOT / "rtunnel").rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "rtunnel/twisted_private.py":
                continue
            for match in pattern.finditer(path.read_text()):
                found.add((match.group(1), rel))
        self.assertEqual(found - NOT_YET_FENCED, set())

    def test_twisted_is_pinned_below_its_next_major_version(self) -> None:
        deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        [spec] = [d for d in deps if d.lower().startswith("twisted")]
        upper = re.search(r"<\s*(\d+)\b", spec)
        self.assertIsNotNone(upper, f"{spec!r} has no upper bound")
        assert upper is not None
        installed = int(twisted.__version__.split(".")[0])
        self.assertEqual(int(upper.group(1)), installed + 1, f"{spec!r} vs installed Twisted {twisted.__version__}")


def vars_of_a_tcp_connection() -> set[str]:
    """Instance attributes FileDescriptor sets in __init__ (e.g. _tempDataLen)."""
    from twisted.internet.abstract import FileDescriptor
    from twisted.internet.testing import MemoryReactor

    return set(vars(FileDescriptor(MemoryReactor())))


class TcpFastPathTests(unittest.SynchronousTestCase):
    """The private TCP state means what twisted_private says it means."""

    def test_a_fresh_transport_is_idle_and_a_queued_write_is_held(self) -> None:
        from twisted.internet.abstract import FileDescriptor
        from twisted.internet.testing import MemoryReactor

        transport = FileDescriptor(MemoryReactor())
        transport.connected = 1
        transport.writeSomeData = lambda data: len(data)  # type: ignore[method-assign]
        self.assertTrue(twisted_private.tcp_idle(transport))
        transport.write(b"queued")
        self.assertFalse(twisted_private.tcp_idle(transport))
        self.assertEqual(twisted_private.tcp_held(transport), 6)
