"""The client's UDP flows (#16): one connected local UDP socket per flow.

The server names a flow per visitor address (docs/udp.md); the client
gives each flow its own socket connected to the tunnel's target, so the
target's replies on that socket belong to that visitor and nobody else.
A flow's socket is closed after `idle_timeout` without a datagram either
way. Flows belong to the session: they survive a resume, and a new session
(whose server numbers flows afresh) forgets them all. Nothing is queued:
what the link or the target cannot take now is dropped and counted.
Datagrams from the link are written at the end of the reactor turn they
came in, a flow's together (rtunnel.udpsend: one system call for a run).
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import error
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from rtunnel import proxyproto, wire
from rtunnel.addresses import format_host_port, is_ip_literal
from rtunnel.config import TunnelSpec
from rtunnel.udpsend import BatchSender

#: send(tunnel, flow, payload) -> None if sent, else why it was dropped
DATAGRAMS_PER_TURN = 8  # read from a flow's socket per reactor turn (as rtunnel.server.udp)
READ_PER_TURN = 256 * 1024  # Twisted's maxThroughput, restored each turn
Sender = Callable[[int, int, bytes], "str | None"]
MAX_DATAGRAM = 65535


#: rtunnel.udpsend's reasons -> the drop reasons of docs/udp.md
_DROP_REASONS = {"too_big": "too_big", "full": "target_full", "refused": "target_refused"}


class TunnelCounters:
    """Datagrams and bytes of one UDP tunnel, both ways, and drops by reason."""

    def __init__(self) -> None:
        self.datagrams_in = self.bytes_in = 0  # from the server, to the target
        self.datagrams_out = self.bytes_out = 0  # from the target, to the server
        self.flows_opened = 0
        self.drops: Counter[str] = Counter()


class LocalFlow(DatagramProtocol):
    """One flow's socket, connected to the target."""

    noisy = False

    def __init__(self, flows: UdpFlows, key: tuple[int, int], header: bytes, now: float) -> None:
        self.flows = flows
        self.key = key
        self.header = header  # the PROXY v2 DGRAM header put before each datagram, or b""
        self.last_seen = now
        self.port: Any = None
        self._this_turn = 0
        self.pending: list[bytes] = []  # datagrams for the target, written at the end of the turn

    def dropped(self, reason: str, datagrams: Sequence[bytes]) -> None:
        """`datagrams` for the target were not sent (rtunnel.udpsend's reasons)."""
        drops = self.flows.counters(self.key[0]).drops
        drops[_DROP_REASONS.get(reason, "target_full")] += len(datagrams)

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self._this_turn += 1
        if self._this_turn == 1:
            self.flows.reactor.callLater(0, self._next_turn)
        elif self._this_turn == DATAGRAMS_PER_TURN and self.port is not None:
            self.port.maxThroughput = 0  # a flooding target leaves the link's streams their turn
        self.flows.from_target(self, data)

    def _next_turn(self) -> None:
        self._this_turn = 0
        if self.port is not None:
            self.port.maxThroughput = READ_PER_TURN

    def connectionRefused(self) -> None:
        """The target's port answered ICMP port unreachable (nothing listens)."""
        self.flows.counters(self.key[0]).drops["target_refused"] += 1

    def stopProtocol(self) -> None:
        """The socket is closed. Not always by us: Linux reports a pending
        ICMP error (the target went away) as EPOLLERR, which Twisted's
        reactor takes for the end of the socket. Such a flow is forgotten;
        the visitor's next datagram opens a new socket."""
        self.flows.socket_closed(self)


class UdpFlows:
    """Every flow of the client's UDP tunnels, keyed by (tunnel, flow)."""

    log = Logger()

    def __init__(self, reactor: Any, idle_timeout: float, max_flows: int, send: Sender) -> None:
        self.reactor = reactor
        self.idle_timeout = idle_timeout
        self.max_flows = max_flows
        self.send = send
        self.flows: dict[tuple[int, int], LocalFlow] = {}
        self.per_tunnel: Counter[int] = Counter()  # open flows per tunnel
        self.tunnels: dict[int, TunnelCounters] = {}
        # tunnel -> (its target as configured, resolved to (IP, port)): a retarget resolves again
        self._targets: dict[int, tuple[tuple[str, int], tuple[str, int]]] = {}
        self._sweep: Any = None
        self.sender = BatchSender()
        self._dirty: list[LocalFlow] = []  # flows with datagrams to write at the end of this turn
        self._flush_call: Any = None

    def counters(self, tunnel_id: int) -> TunnelCounters:
        counters = self.tunnels.get(tunnel_id)
        if counters is None:
            counters = self.tunnels[tunnel_id] = TunnelCounters()
        return counters

    # ------------------------------------------------------------ server -> target

    def deliver(self, spec: TunnelSpec, public: tuple[str, int] | None, datagram: wire.Datagram) -> None:
        """A datagram from the server for flow `datagram.flow` of `spec`:
        write it to the flow's socket (opened on the first one)."""
        key = (datagram.tunnel, datagram.flow)
        counters = self.counters(datagram.tunnel)
        counters.datagrams_in += 1
        counters.bytes_in += len(datagram.payload)
        flow = self.flows.get(key)
        now = self.reactor.seconds()
        if flow is None:
            flow = self._open(spec, public, datagram, counters, now)
            if flow is None:
                return
        elif datagram.address is not None and spec.proxy_protocol == proxyproto.V2 and public is not None:
            flow.header = proxyproto.datagram_header(list(datagram.address), list(public))
        flow.last_seen = now
        pending = flow.pending
        pending.append(flow.header + datagram.payload if flow.header else datagram.payload)
        if len(pending) == 1:
            self._dirty.append(flow)
            if self._flush_call is None:
                self._flush_call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        """Write the datagrams that came in this turn, each flow's in order
        and together (one system call per run of equal sizes where the
        kernel has UDP GSO). What the socket refuses is dropped and counted:
        `target_full` (its buffer is full), `target_refused` (nothing
        listens), `too_big`."""
        self._flush_call = None
        dirty, self._dirty = self._dirty, []
        batches = [(flow, flow.pending) for flow in dirty]
        for flow in dirty:  # first: a failure below cannot leave a flow unflushed for good
            flow.pending = []
        flows, send_batch = self.flows, self.sender.send_batch
        for flow, pending in batches:
            if flows.get(flow.key) is flow and flow.port is not None:
                send_batch(flow.port.socket, pending, flow.dropped)

    def _open(
        self, spec: TunnelSpec, public: tuple[str, int] | None, datagram: wire.Datagram,
        counters: TunnelCounters, now: float,
    ) -> LocalFlow | None:
        tunnel_id = datagram.tunnel
        if self.per_tunnel[tunnel_id] >= self.max_flows:
            counters.drops["flow_limit"] += 1
            return None
        target = self._target(spec)
        if target is None:
            counters.drops["target_unresolved"] += 1
            return None
        header = b""
        if spec.proxy_protocol == proxyproto.V2:
            src = list(datagram.address) if datagram.address is not None else None
            header = proxyproto.datagram_header(src, list(public) if public is not None else None)
        flow = LocalFlow(self, (tunnel_id, datagram.flow), header, now)
        family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        try:
            flow.port = self._open_socket(flow, family, target)
        except (error.CannotListenError, OSError) as e:
            counters.drops["socket_error"] += 1
            self.log.warn(
                "cannot open a UDP socket to {target} for a flow: {why}", target=spec.target, why=str(e),
                event="udp_flow_failed", tunnel=tunnel_id, flow=datagram.flow,
            )
            return None
        self.flows[flow.key] = flow
        self.per_tunnel[tunnel_id] += 1
        counters.flows_opened += 1
        visitor = format_host_port(*datagram.address) if datagram.address is not None else "?"
        self.log.info(
            "UDP flow {flow} from {visitor} -> {target}", flow=datagram.flow, visitor=visitor, target=spec.target,
            event="udp_flow_opened", tunnel=tunnel_id, src=list(datagram.address or ("?", 0)),
            flows=len(self.flows),
        )
        self._schedule_sweep()
        return flow

    def _open_socket(self, flow: LocalFlow, family: int, target: tuple[str, int]) -> Any:
        """A UDP socket on an ephemeral port, connected to `target` (adopted,
        not listenUDP: Twisted would log a line for each flow's socket)."""
        skt = socket.socket(family, socket.SOCK_DGRAM)
        try:
            skt.setblocking(False)
            skt.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            port = self.reactor.adoptDatagramPort(skt.fileno(), family, flow, maxPacketSize=MAX_DATAGRAM)
        finally:
            skt.close()  # adoptDatagramPort made its own copy of the descriptor
        try:
            port.connect(*target)
        except BaseException:
            port.stopListening()
            raise
        return port

    def _target(self, spec: TunnelSpec) -> tuple[str, int] | None:
        """The target as (IP, port): a host name is resolved once per tunnel."""
        cached = self._targets.get(spec.tunnel_id)
        if cached is not None and cached[0] == (spec.target_host, spec.target_port):
            return cached[1]
        host = spec.target_host
        if not is_ip_literal(host):
            try:
                infos = socket.getaddrinfo(host, spec.target_port, type=socket.SOCK_DGRAM)
            except OSError as e:
                self.log.warn(
                    "cannot resolve the UDP target {target}: {why}", target=spec.target, why=str(e),
                    event="udp_target_unresolved", tunnel=spec.tunnel_id,
                )
                return None
            host = str(infos[0][4][0])
        target = (host.strip("[]"), spec.target_port)
        self._targets[spec.tunnel_id] = ((spec.target_host, spec.target_port), target)
        return target

    # ------------------------------------------------------------ target -> server

    def from_target(self, flow: LocalFlow, data: bytes) -> None:
        tunnel_id, flow_id = flow.key
        counters = self.counters(tunnel_id)
        flow.last_seen = self.reactor.seconds()
        dropped = self.send(tunnel_id, flow_id, data)
        if dropped is None:
            counters.datagrams_out += 1
            counters.bytes_out += len(data)
        else:
            counters.drops[dropped] += 1

    # ------------------------------------------------------------ lives

    def _schedule_sweep(self) -> None:
        if self._sweep is None or not self._sweep.active():
            self._sweep = self.reactor.callLater(max(self.idle_timeout / 4, 0.05), self.sweep)

    def sweep(self) -> None:
        """Close flows idle for the idle timeout; again later while any live."""
        self._sweep = None
        now = self.reactor.seconds()
        for key, flow in list(self.flows.items()):
            if now - flow.last_seen >= self.idle_timeout:
                self._close(key, flow)
        if self.flows:
            self._schedule_sweep()

    def _close(self, key: tuple[int, int], flow: LocalFlow) -> None:
        del self.flows[key]  # first: socket_closed then knows it was us
        flow.pending = []
        self.per_tunnel[key[0]] -= 1
        if flow.port is not None:
            flow.port.stopListening()

    def socket_closed(self, flow: LocalFlow) -> None:
        if self.flows.get(flow.key) is flow:  # not closed by _close: the reactor dropped it
            del self.flows[flow.key]
            self.per_tunnel[flow.key[0]] -= 1
            self.counters(flow.key[0]).drops["target_refused"] += 1
            self.log.info(
                "UDP flow {flow}: its socket to the target was closed (the target went away); the "
                "visitor's next datagram opens a new one", flow=flow.key[1], event="udp_flow_lost",
                tunnel=flow.key[0],
            )

    def drop_tunnel(self, tunnel_id: int) -> None:
        """A tunnel was removed: close its flows."""
        for key, flow in list(self.flows.items()):
            if key[0] == tunnel_id:
                self._close(key, flow)
        self._targets.pop(tunnel_id, None)

    def clear(self) -> None:
        """A new session (flow ids start again), or the client stops."""
        for key, flow in list(self.flows.items()):
            self._close(key, flow)
        self.per_tunnel.clear()
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        self._dirty = []
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
