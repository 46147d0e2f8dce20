"""Every private Twisted name rtunnel uses, and nothing else.

rtunnel goes past Twisted's public API in two places, for speed: the TCP
transport's write queue (`rtunnel.transports`: send at once when nothing is
queued, half-close without waiting a reactor turn) and the TLS layer's state
(`rtunnel.tlslink`: encrypt a turn's writes in one go, decrypt a read's
records in one go). Each private name is touched here only, under a name
that says what it means; tests/test_twisted_private.py checks that every
one of them (`PRIVATE_NAMES`) exists on the installed Twisted, and
pyproject.toml pins Twisted below its next major version.

Also listed (used elsewhere, by other modules' owners): `usage.Options`'
`_dispatch` (the option handlers that rtunnel.configfile and rtunnel.tap
apply a config file's values through).
"""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import WantReadError
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

#: (where, attribute) for every private name used: what the test checks.
#: "tcp" is twisted.internet.tcp.Connection (a FileDescriptor), "tls" is
#: twisted.protocols.tls.TLSMemoryBIOProtocol, "options" is
#: twisted.python.usage.Options (an instance: `_dispatch` is set in __init__).
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    ("tcp", "_tempDataLen"),
    ("tcp", "_writeDisconnecting"),
    ("tcp", "_writeDisconnected"),
    ("tcp", "_closeWriteConnection"),
    ("tls", "_handshakeDone"),
    ("tls", "_appSendBuffer"),
    ("tls", "_lostTLSConnection"),
    ("tls", "_producer"),
    ("tls", "_aborted"),
    ("tls", "_write"),
    ("tls", "_flushSendBIO"),
    ("tls", "_flushReceiveBIO"),
    ("tls", "_shutdownTLS"),
    ("tls", "_tlsShutdownFinished"),
    ("options", "_dispatch"),
)

# ---------------------------------------------------------------- TCP


def tcp_idle(transport: Any) -> bool:
    """True for a connected TCP transport (Twisted's FileDescriptor) with
    nothing queued to write and no close under way: a write may go to the
    socket at once (`writeSomeData`) without reordering anything."""
    return (
        getattr(transport, "writeSomeData", None) is not None
        and transport.connected
        and not transport.disconnecting
        and not getattr(transport, "_writeDisconnecting", True)
        and not getattr(transport, "_tempDataLen", 1)
        and len(transport.dataBuffer) == transport.offset
    )


def tcp_held(transport: Any) -> int:
    """Bytes a TCP transport holds in memory for writing: its buffer (with
    the part already sent, until Twisted compacts it) and the writes not
    yet joined to it."""
    return len(transport.dataBuffer) + transport._tempDataLen


def tcp_close_write_now(transport: Any) -> bool:
    """Shut down sending at once (shutdown(SHUT_WR), then the protocol's
    writeConnectionLost), as FileDescriptor.doWrite does once its queue is
    empty. The caller checked `tcp_idle` and that no producer is
    registered. False (nothing done) if this transport cannot.

    Twisted shuts a socket down only from doWrite, so it never calls doWrite
    on one it shut. Done here, that can happen once: the reactor event that
    completes an outgoing connect reports "writable" and, when the peer has
    already sent something, "readable" too; Twisted runs connectionMade from
    the read half and then calls doWrite, whose empty send() on the shut
    socket fails with EPIPE and would end the connection as lost (a target
    that speaks first, reached by a stream whose FIN came before the
    connect). From here on nothing can be written, so doWrite has nothing
    to do; loseConnection() closes without it."""
    close = getattr(transport, "_closeWriteConnection", None)
    if close is None:
        return False
    transport._writeDisconnecting = True
    transport._writeDisconnected = True
    transport.doWrite = transport.stopWriting  # a write event already polled: nothing to send, no error
    close()
    return True


# ---------------------------------------------------------------- TLS


class TLSProtocolBase(TLSMemoryBIOProtocol):
    """`TLSMemoryBIOProtocol` with the private state and steps that
    `rtunnel.tlslink.LinkTLSProtocol` uses, under public names."""

    @property
    def tls_ready(self) -> bool:
        """Handshake done, nothing held back, not shut down: application
        bytes may be encrypted and sent straight away."""
        return self._handshakeDone and not self._appSendBuffer and not self._lostTLSConnection

    @property
    def tls_lost(self) -> bool:
        """The TLS connection is shut down or failed: nothing more is
        encrypted or decrypted."""
        return self._lostTLSConnection

    @property
    def tls_aborted(self) -> bool:
        """abortConnection was called: nothing more is delivered up."""
        return self._aborted

    @property
    def tls_has_producer(self) -> bool:
        return self._producer is not None

    def tls_write_slow(self, data: bytes) -> None:
        """Encrypt and send `data` the base class's way (which also holds
        it back while the handshake or a renegotiation needs the peer)."""
        TLSMemoryBIOProtocol._write(self, data)

    def tls_flush_send_bio(self) -> None:
        """Send what OpenSSL put in the send BIO (an alert, a key update)."""
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        # Twisted's step that moves the send BIO's bytes (a handshake flight,
        # an alert, the base class's writes) to the transport: as Twisted
        # does it, but through tls_send_ciphertext.
        try:
            data = self.getHandle().bio_read(2**15)
        except WantReadError:
            return  # nothing in the send BIO now
        self.tls_send_ciphertext(data)

    def tls_send_ciphertext(self, data: bytes) -> None:
        """Where the base class's ciphertext goes: `transport.write` (a
        subclass may send it at once)."""
        self.transport.write(data)  # type: ignore[union-attr]

    def tls_failed(self, failure: Failure) -> None:
        """OpenSSL raised: close the connection with `failure`."""
        self._tlsShutdownFinished(failure)

    def tls_peer_closed(self) -> None:
        """The peer's close_notify arrived: answer it and close."""
        self._shutdownTLS()
        self._tlsShutdownFinished(None)

    def _flushReceiveBIO(self) -> None:
        # Twisted's hook after ciphertext was fed to OpenSSL
        self.decrypt_received()

    def decrypt_received(self) -> None:
        """Decrypt what the receive BIO holds and deliver it (the base
        class's way unless overridden)."""
        TLSMemoryBIOProtocol._flushReceiveBIO(self)
