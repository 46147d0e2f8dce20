"""TLS for the control link: Twisted's TLS layer with a lean data path.

`twisted.protocols.tls` does the handshake, certificate checks, shutdown and
errors; this subclass changes only how application bytes move once the
handshake is done:

* Writes made during one reactor turn (every frame of every stream) are
  encrypted record by record: small writes joined up to a record, large
  payloads straight from a memoryview (a frame's header and payload are
  never joined); the ciphertext is read back from the memory BIO in 64 KiB
  pieces and handed to the socket at once (`write_now`). Twisted's own path copies each write twice more, cuts it
  into 16 KiB copies and makes a `bio_read` and a transport write per
  record.
* Reads decrypt every record the socket delivered and pass the plaintext
  up in one `dataReceived`, not one call per 16 KiB record.

Before the handshake completes, while Twisted holds writes back, and on
every error or shutdown path, the base class does the work exactly as
before. The base class's private state is read through
`rtunnel.twisted_private.TLSProtocolBase`.

Memory: the memory BIOs between OpenSSL and the socket keep the largest
buffer they ever held (the handshake's messages, a burst's 64 KiB reads
and 256 KiB flushes). `release_idle_buffers` (which the control link calls
at each keepalive tick) gives them back once they have grown and hold
nothing (`rtunnel.openssl_private.renew_memory_bios`), so an idle
connection holds no buffer sized by its past.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from rtunnel.mux import cancel_call
from rtunnel.openssl_private import renew_memory_bios
from rtunnel.transports import write_now
from rtunnel.twisted_private import TLSProtocolBase

#: Plaintext written in one turn that is encrypted and sent without waiting
#: for the end of the turn.
FLUSH_AT = 256 * 1024

#: Plaintext a TLS record holds at most.
RECORD_PLAINTEXT = 16 * 1024

#: Plaintext asked for per SSL_read.
READ_CHUNK = RECORD_PLAINTEXT

#: Ciphertext taken from the memory BIO per bio_read and send(): large
#: enough for few calls, small enough to stay clear of malloc's mmap
#: threshold (a fresh mapping and page faults for every buffer).
CIPHERTEXT_PIECE = 64 * 1024

#: A read or a flush larger than this grows a memory BIO's buffer enough to
#: be worth giving back (`LinkTLSProtocol.release_idle_buffers`).
GROWN_ABOVE = 4 * 1024


def _segments(pieces: list[bytes]) -> Iterator[bytes | memoryview]:
    """The bytes of `pieces` in order, as buffers to encrypt: small pieces
    joined up to a full record, a large piece encrypted where it lies (its
    head tops up the small pieces before it to a record). A frame's header
    and its large payload are never copied into one buffer."""
    gathered: list[bytes | memoryview] = []
    size = 0
    for piece in pieces:
        if not piece:
            continue
        if len(piece) < RECORD_PLAINTEXT:
            gathered.append(piece)
            size += len(piece)
            if size >= RECORD_PLAINTEXT:
                yield b"".join(gathered)
                gathered, size = [], 0
            continue
        view = memoryview(piece)
        if gathered:
            head = RECORD_PLAINTEXT - size
            gathered.append(view[:head])
            yield b"".join(gathered)
            gathered, size = [], 0
            view = view[head:]
        yield view
    if gathered:
        yield b"".join(gathered)


class LinkTLSProtocol(TLSProtocolBase):
    """`TLSMemoryBIOProtocol` with per-turn write batching and batched reads."""

    factory: LinkTLSFactory

    #: The memory BIOs may hold grown buffers (the handshake grows them):
    #: `release_idle_buffers` has something to give back.
    bios_grown = True

    def __init__(self, factory: LinkTLSFactory, wrappedProtocol: Any, *args: Any) -> None:
        super().__init__(factory, wrappedProtocol, *args)
        self._outgoing: list[bytes] = []
        self._outgoing_size = 0
        self._flush_call: IDelayedCall | None = None

    # ------------------------------------------------------------ writing

    def write(self, data: bytes) -> None:
        if self.disconnecting and not self.tls_has_producer:
            return  # as the base class: nothing is written after loseConnection
        if not self.tls_ready:
            self.flush()
            TLSMemoryBIOProtocol.write(self, data)
            return
        self._outgoing.append(data)
        self._outgoing_size += len(data)
        if self._outgoing_size >= FLUSH_AT:  # (as _queued, inline: one call less per frame)
            self.flush()
        elif self._flush_call is None:
            self._flush_call = self.factory.clock.callLater(0, self._flush_at_end_of_turn)

    def writeSequence(self, data: Any) -> None:
        """Several writes (a frame's header and payload) with one check of
        the TLS state, queued as they are (never joined)."""
        if (self.disconnecting and not self.tls_has_producer) or not self.tls_ready:
            for chunk in data:
                self.write(chunk)
            return
        outgoing = self._outgoing
        for chunk in data:
            outgoing.append(chunk)
            self._outgoing_size += len(chunk)
        self._queued()

    def _queued(self) -> None:
        """Writes were queued: send them now if they are many, else at the
        end of the turn."""
        if self._outgoing_size >= FLUSH_AT:
            self.flush()
        elif self._flush_call is None:
            self._flush_call = self.factory.clock.callLater(0, self._flush_at_end_of_turn)

    def _flush_at_end_of_turn(self) -> None:
        self._flush_call = None
        self.flush()

    def flush(self) -> None:
        """Encrypt and send every write queued in this turn."""
        outgoing, size = self._outgoing, self._outgoing_size
        self._drop_outgoing()
        if not outgoing or self.tls_lost:
            return
        if not self.tls_ready:  # the handshake, or writes held back until the peer's bytes arrive
            self.tls_write_slow(b"".join(outgoing))
            return
        # pyOpenSSL turns on partial writes: each SSL_write takes one record.
        # The records gather in the memory BIO and leave in 64 KiB bio_reads.
        if size > GROWN_ABOVE:  # its ciphertext gathers in the send BIO
            self.bios_grown = True
        tls = self.getHandle()
        segments = _segments(outgoing)
        for segment in segments:
            view = memoryview(segment)
            total = len(view)
            sent = 0
            try:
                while sent < total:
                    sent += tls.send(view[sent:])
            except WantReadError:
                # held until the peer's bytes arrive (the base class buffers it)
                self._send_ciphertext()
                self.tls_write_slow(b"".join([view[sent:], *segments]))
                return
            except Error:
                self.tls_failed(Failure())
                return
        self._send_ciphertext()

    def _send_ciphertext(self) -> None:
        """Move the memory BIO's ciphertext to the socket, a piece at a time:
        each goes out at once while the socket takes it, then queues."""
        tls = self.getHandle()
        while True:
            try:
                piece = tls.bio_read(CIPHERTEXT_PIECE)
            except WantReadError:
                return
            write_now(self.transport, piece)
            if len(piece) < CIPHERTEXT_PIECE:
                return

    def loseConnection(self) -> None:
        self.flush()
        super().loseConnection()

    def unregisterProducer(self) -> None:
        self.flush()  # the base class may start the TLS shutdown here
        super().unregisterProducer()

    def abortConnection(self) -> None:
        self._drop_outgoing()
        super().abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._drop_outgoing()
        super().connectionLost(reason)

    def _drop_outgoing(self) -> None:
        """Forget the turn's queued writes and the timer that would send them."""
        call, self._flush_call = self._flush_call, None
        cancel_call(call)
        self._outgoing, self._outgoing_size = [], 0

    # ------------------------------------------------------------ memory

    def release_idle_buffers(self) -> bool:
        """Give back the memory BIOs' buffers if a past read, flush or the
        handshake grew them and they hold nothing now; True if it did.
        Cheap when there is nothing to give back (one attribute check)."""
        if not self.bios_grown or not self.tls_ready:
            return False
        if renew_memory_bios(self.getHandle()):
            self.bios_grown = False
            return True
        return False

    # ------------------------------------------------------------ reading

    def decrypt_received(self) -> None:
        """Decrypt every complete record in the receive BIO and deliver the
        plaintext in one call (the base class delivers each record)."""
        tls = self.getHandle()
        pieces: list[bytes] = []
        while not self.tls_lost:
            try:
                pieces.append(tls.recv(READ_CHUNK))
            except WantReadError:
                break
            except ZeroReturnError:
                # the peer's close_notify: deliver what came before it, then shut down
                self._deliver(pieces)
                pieces = []
                self.tls_peer_closed()
            except Error:
                self._deliver(pieces)
                pieces = []
                self.tls_failed(Failure())
        self._deliver(pieces)
        # SSL_read may have produced bytes to send (an alert, a key update)
        self.tls_flush_send_bio()

    def _deliver(self, pieces: list[bytes]) -> None:
        if pieces and not self.tls_aborted:
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            if len(data) > GROWN_ABOVE:  # its ciphertext went through the receive BIO
                self.bios_grown = True
            ProtocolWrapper.dataReceived(self, data)


class LinkTLSFactory(TLSMemoryBIOFactory):
    """A `TLSMemoryBIOFactory` whose connections are `LinkTLSProtocol`s."""

    protocol = LinkTLSProtocol

    def __init__(
        self,
        creator: Any,
        is_client: bool,
        wrapped: IProtocolFactory,
        clock: IReactorTime | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        super().__init__(creator, is_client, wrapped, clock)
        self.clock: IReactorTime = clock  # type: ignore[assignment]


class LinkTLSEndpoint:
    """A client endpoint that runs TLS (`LinkTLSProtocol`) over `endpoint`;
    what `twisted.internet.endpoints.wrapClientTLS` does with Twisted's TLS."""

    def __init__(self, creator: Any, endpoint: Any, clock: IReactorTime | None = None) -> None:
        self._creator = creator
        self._endpoint = endpoint
        self._clock = clock

    def connect(self, factory: IProtocolFactory) -> Any:
        d = self._endpoint.connect(LinkTLSFactory(self._creator, True, factory, self._clock))
        return d.addCallback(lambda tls: tls.wrappedProtocol)
