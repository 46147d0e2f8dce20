"""Public UDP ports (#16): a UDP socket per claimed UdpPort, its flows.

Each visitor address (IP, port) that sends to a public UDP port is a
*flow*: the server numbers it (per tunnel, from 1, never reused) and sends
its datagrams to the holder's client as DATAGRAM frames; the client's
replies on that flow go back to that address. Nothing is queued: a
datagram the link cannot take now is dropped and counted by reason
(docs/udp.md). Ownership is the claims registry's, with the same rules as
TCP ports (rtunnel.server.claims): the same policy (`--allow-ports`,
clients-file `ports` and `bind`), the same hand-over between sessions of
one credential.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, error
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from rtunnel import wire
from rtunnel.addresses import IPV4_ANY, NO_IPV6_ERRNOS, format_host_port, unmap
from rtunnel.server.claims import Claim, ClaimRefused, ClaimRegistry, UdpPort
from rtunnel.server.ports import PICK_PORT_ATTEMPTS, BindRefused, listen_refused
from rtunnel.udpport import listen_udp
from rtunnel.udpsend import BatchSender

if TYPE_CHECKING:
    from rtunnel.server import TunnelServer
    from rtunnel.server.session import ServerSession

#: Kernel buffers of a public UDP socket: a burst of datagrams waits here
#: (not in our memory) while the reactor is busy.
SOCKET_BUFFER = 4 * 1024 * 1024
MAX_DATAGRAM = 65535  # what one recvfrom may return
#: Datagrams read from one UDP socket per reactor turn, at most (Twisted
#: reads up to 256 KiB, 4,000 datagrams of 64 bytes): a datagram costs about
#: what a 256 KiB read of a TCP stream costs, so 8 per turn keep the
#: session's TCP streams going under a flood (docs/udp.md, "Fairness").
#: The datagrams of one read go to the control link in one write.
DATAGRAMS_PER_TURN = 8

#: One per process: several replies to one visitor in one system call (rtunnel.udpsend).
SENDER = BatchSender()

#: Reasons a datagram is dropped (the metrics' `reason` label, docs/udp.md).
DROP_REASONS = (
    "link_down", "too_big", "backlog", "flow_backlog", "flow_limit", "unknown_flow", "socket_error",
    "not_permitted",
)


@dataclass(slots=True)
class Flow:
    """One visitor address of a UDP tunnel, as the server sees it."""

    id: int
    address: tuple[str, int]
    last_seen: float
    told_epoch: int = 0  # the link (Session.link_epoch) that has been sent the address
    datagrams_in: int = 0  # from the visitor
    bytes_in: int = 0
    datagrams_out: int = 0  # to the visitor
    bytes_out: int = 0
    to: tuple[str, int] = ("", 0)  # the address as the port's socket writes it (IPv4 on `::`: mapped)
    pending: list[bytes] = field(default_factory=list)  # replies, sent at the end of the turn


class UdpTunnel(DatagramProtocol):
    """A bound public UDP port and its flows (keyed by visitor address).
    Flows belong to the port's holder: a hand-over to another session
    forgets them (the new session names its own)."""

    log = Logger()
    noisy = False

    def __init__(self, server: TunnelServer, host: str) -> None:
        self.server = server
        self.host = host
        self.claim: Claim[ServerSession] | None = None
        self.port: Any = None  # rtunnel.udpport.ReadPort
        self.flows: dict[tuple[str, int], Flow] = {}
        self.by_id: dict[int, Flow] = {}
        self._next_flow = 1
        self.datagrams_in = self.bytes_in = self.datagrams_out = self.bytes_out = 0
        self.flows_opened = 0
        self.drops: Counter[str] = Counter()
        self._sweep: Any = None
        # on `::` for a client that may not bind 0.0.0.0: IPv4 visitors
        # (IPv4-mapped sources of the dual-stack socket) are not served
        self.ipv6_only = False
        #: flows of visitors at other fleet members: where their replies go (rtunnel.fleet.udpedge)
        self.carried: dict[tuple[str, int], Callable[[bytes], None]] = {}
        self._holding: Any = None  # the mux session holding this read's datagrams (Session.hold_datagrams)
        self._replying: list[Flow] = []  # flows with replies to send at the end of the turn
        self._reply_call: Any = None
        self._lost = 0  # bytes of the flow's replies being sent that were dropped
        self._key: tuple[str, int] = (host, 0)
        self._key_of: Any = None  # the port `_key` was read from

    @property
    def owner(self) -> ServerSession | None:
        return self.claim.holder if self.claim is not None else None

    @property
    def tunnel_id(self) -> int:
        return self.claim.tag if self.claim is not None else 0

    @property
    def key(self) -> tuple[str, int]:
        port = self.port
        assert port is not None
        if self._key_of is not port:  # asked per dropped datagram: getsockname() once per socket
            self._key, self._key_of = (self.host, port.getHost().port), port
        return self._key

    # ------------------------------------------------------------ visitor -> client

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        claim = self.claim
        if claim is None:
            return
        owner = claim.holder
        if owner.expired:
            return
        address = addr
        host = addr[0]
        if ":" in host:
            host = unmap(host)
            if host != addr[0]:
                if self.ipv6_only:
                    self.drops["not_permitted"] += 1
                    return
                address = (host, addr[1])
        flow = self.flows.get(address)
        now = self.server.reactor.seconds()
        if flow is None:
            flow = self._open_flow(owner, address, now)
            if flow is None:
                return
        flow.last_seen = now
        flow.datagrams_in += 1
        flow.bytes_in += len(data)
        self.datagrams_in += 1
        self.bytes_in += len(data)
        mux = owner.mux_session
        if self._holding is not mux:
            self._release()
            mux.hold_datagrams()  # this read's datagrams go to the link in one write (read_done)
            self._holding = mux
        epoch = mux.link_epoch
        dropped = mux.send_datagram(
            self.tunnel_id, flow.id, data, address if flow.told_epoch != epoch else None,
        )
        if dropped is None:
            flow.told_epoch = epoch
        else:
            self.drop(dropped, owner, address)

    def read_done(self) -> None:
        """The end of one read of the socket (rtunnel.udpport): write its datagrams."""
        if self._holding is not None:
            self._release()

    def _release(self) -> None:
        mux, self._holding = self._holding, None
        if mux is not None:
            mux.release_datagrams()

    def _open_flow(self, owner: ServerSession, address: tuple[str, int], now: float) -> Flow | None:
        limit = self.server.config.udp_max_flows
        if len(self.flows) >= limit or self._next_flow > wire.MAX_U32:
            self.drop("flow_limit", owner, address, limit=limit)
            return None
        flow = Flow(self._next_flow, address, now, to=self._to(address))
        self._next_flow += 1
        self.flows[address] = self.by_id[flow.id] = flow
        self.flows_opened += 1
        self.log.info(
            "UDP flow {flow} from {visitor} on port {port}", flow=flow.id,
            visitor=format_host_port(*address), port=self.key[1], event="udp_flow_opened",
            session=owner.id[:8], credential=owner.credential, tunnel=self.tunnel_id,
            src=list(address), flows=len(self.flows),
        )
        self._schedule_sweep()
        return flow

    def drop(self, reason: str, owner: ServerSession | None = None, address: Any = None, **fields: Any) -> None:
        """Count a dropped datagram; log the first of a burst per reason."""
        self.drops[reason] += 1
        if owner is not None:
            owner.server.refusals.refused(
                ("udp_drop", owner.id, self.tunnel_id, reason),
                "UDP port {port}: dropping datagrams ({reason}), the latest from {visitor}",
                port=self.key[1] if self.port is not None else 0, reason=reason,
                visitor=format_host_port(*address) if address else "?", event="udp_dropped",
                session=owner.id[:8], credential=owner.credential, tunnel=self.tunnel_id, **fields,
            )

    # ------------------------------------------------------------ client -> visitor

    def reply(self, flow_id: int, payload: bytes) -> None:
        """The client's datagram for flow `flow_id`: to its visitor, now or
        never (at the end of this reactor turn, with the flow's others)."""
        flow = self.by_id.get(flow_id)
        if flow is None or self.port is None:
            self.drops["unknown_flow"] += 1  # it idled out here: the visitor must send again
            return
        flow.last_seen = self.server.reactor.seconds()
        carried = self.carried.get(flow.address) if self.carried else None
        if carried is not None:
            try:
                carried(payload)  # to the fleet member the visitor is at
            except (OSError, error.MessageLengthError):
                self.drops["socket_error"] += 1
            return
        pending = flow.pending
        pending.append(payload)
        if len(pending) == 1:
            self._replying.append(flow)
            if self._reply_call is None:
                self._reply_call = self.server.reactor.callLater(0, self.send_replies)

    def send_replies(self) -> None:
        """Send the turn's replies, each flow's together (one system call
        per run of equal sizes, rtunnel.udpsend); what the socket refuses
        is dropped and counted (`socket_error`, `too_big`)."""
        self._reply_call = None
        flows, self._replying = self._replying, []
        port = self.port
        if port is None:
            for flow in flows:
                flow.pending = []
            return
        skt = port.socket
        batches = [(flow, flow.pending) for flow in flows]
        for flow in flows:  # first: a failure below cannot leave a flow unsent for good
            flow.pending = []
        for flow, pending in batches:
            if self.by_id.get(flow.id) is not flow:
                continue  # forgotten meanwhile (a hand-over)
            self._lost = 0
            sent = SENDER.send_batch(skt, pending, self._reply_dropped, flow.to)
            size = sum(map(len, pending)) - self._lost
            flow.datagrams_out += sent
            flow.bytes_out += size
            self.datagrams_out += sent
            self.bytes_out += size

    def _reply_dropped(self, reason: str, datagrams: Sequence[bytes]) -> None:
        self.drops["socket_error"] += len(datagrams)
        self._lost += sum(map(len, datagrams))

    def _to(self, address: tuple[str, int]) -> tuple[str, int]:
        """The visitor's address as this socket writes it (IPv4 on `::`: mapped)."""
        if ":" in self.host and ":" not in address[0]:
            return (f"::ffff:{address[0]}", address[1])
        return address

    # ------------------------------------------------------------ flows' lives

    def _schedule_sweep(self) -> None:
        if self._sweep is None or not self._sweep.active():
            idle = self.server.config.udp_idle_timeout
            self._sweep = self.server.reactor.callLater(max(idle / 4, 0.05), self.sweep)

    def sweep(self) -> None:
        """Forget flows idle for the idle timeout; again later while any live."""
        self._sweep = None
        now = self.server.reactor.seconds()
        idle = self.server.config.udp_idle_timeout
        owner = self.owner
        for address, flow in list(self.flows.items()):
            if now - flow.last_seen >= idle:
                self._close_flow(address, flow, owner, f"idle for {idle:g} s")
        if self.flows:
            self._schedule_sweep()

    def _close_flow(self, address: tuple[str, int], flow: Flow, owner: ServerSession | None, why: str) -> None:
        del self.flows[address]
        del self.by_id[flow.id]
        self.carried.pop(address, None)
        self.log.info(
            "UDP flow {flow} from {visitor} closed ({why}): {din} datagrams in, {dout} out", flow=flow.id,
            visitor=format_host_port(*address), why=why, din=flow.datagrams_in, dout=flow.datagrams_out,
            event="udp_flow_closed", tunnel=self.tunnel_id, src=list(address), reason=why,
            session=owner.id[:8] if owner is not None else "", bytes_in=flow.bytes_in, bytes_out=flow.bytes_out,
        )

    def forget_flows(self, why: str) -> None:
        owner = self.owner
        for address, flow in list(self.flows.items()):
            self._close_flow(address, flow, owner, why)

    def stop(self) -> defer.Deferred[None]:
        """Close the socket and forget every flow."""
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        if self._reply_call is not None and self._reply_call.active():
            self._reply_call.cancel()
        self._reply_call, self._replying = None, []
        self.forget_flows("port closed")
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        stopping = port.stopListening()
        return stopping if stopping is not None else defer.succeed(None)


class UdpPorts:
    """Every public UDP port of the server: BIND's checks (as for TCP
    ports), the registry's verdict, the sockets."""

    log = Logger()

    def __init__(self, server: TunnelServer, claims: ClaimRegistry[ServerSession]) -> None:
        self.server = server
        self.claims = claims
        self.tunnels: dict[tuple[str, int], UdpTunnel] = {}
        self.shutting_down = False
        self.unknown_tunnel = 0  # client datagrams for a tunnel the session no longer has
        #: a fleet member's socket of the port, open as the edge of another member, handed
        #: to `tunnel` (its client moved here) instead of a new bind (rtunnel.fleet.udpedge)
        self.adopt: Callable[[str, int, UdpTunnel], IListeningPort | None] | None = None

    def bind(self, owner: ServerSession, tunnel_id: int, host: str, port: int) -> UdpTunnel:
        """`host:port` ("" host: the server's default) as `owner`'s UDP
        tunnel, or BindRefused saying why not."""
        if self.shutting_down or self.server.shutting_down:
            raise BindRefused("shutdown", "the server is shutting down; try again shortly")
        if host:
            return self._bind(owner, tunnel_id, host, port)
        candidates = [self.server.config.public_host]
        if candidates[0] != IPV4_ANY:
            candidates.append(IPV4_ANY)
        policy = self.server.policy_for(owner.credential)
        if policy is not None:
            allowed = [h for h in candidates if policy.permits_address(h)]
            if not allowed:
                raise BindRefused(
                    "not_permitted",
                    f"client {policy.name} may not bind the default address ({' or '.join(candidates)}); "
                    f"it may bind {', '.join(policy.bind)}: forward one of them, e.g. "
                    f"-f udp:{format_host_port(policy.bind[0], port)}",
                )
            candidates = allowed
        for candidate in candidates:  # the credential's own port (an older session): hand it over
            if port and self.claims.owner(UdpPort(candidate, port)) == owner.credential:
                return self._bind(owner, tunnel_id, candidate, port)
        for candidate in candidates[:-1]:
            try:
                return self._bind(owner, tunnel_id, candidate, port)
            except BindRefused as refusal:
                if refusal.socket_errno not in NO_IPV6_ERRNOS:
                    raise
        return self._bind(owner, tunnel_id, candidates[-1], port)

    def _bind(self, owner: ServerSession, tunnel_id: int, host: str, port: int) -> UdpTunnel:
        policy = self.server.ports.check_permitted(owner, host, port)
        if port == 0:
            return self._bind_any(owner, tunnel_id, host, policy)
        name = UdpPort(host, port)
        try:
            claimed = self.claims.claim(name, owner, tunnel_id)
        except ClaimRefused as refusal:
            if refusal.code == ClaimRefused.TAKEN_OVER:
                raise BindRefused(
                    "taken_over",
                    f"UDP port {port} on {host} is held by a newer session of client {owner.credential}; "
                    "this client gets it when that session lets go of it",
                    repeated=refusal.repeated,
                ) from None
            raise BindRefused(
                "in_use", f"UDP port {port} on {host} is held by another client; choose another port",
            ) from None
        if claimed.previous is not None:
            held = self.tunnels[(host, port)]
            self._hand_over(held, claimed.claim, claimed.previous)
            return held
        tunnel = UdpTunnel(self.server, host)
        tunnel.claim = claimed.claim
        tunnel.ipv6_only = _is_any6(host) and self.server.ports.ipv6_only_for(owner.credential, host)
        try:
            tunnel.port = self._listen(tunnel, host, port)
        except BindRefused:
            self.claims.release(claimed.claim, hand_on=False)
            raise
        self.tunnels[tunnel.key] = tunnel
        return tunnel

    def _bind_any(self, owner: ServerSession, tunnel_id: int, host: str, policy: Any) -> UdpTunnel:
        tunnel = UdpTunnel(self.server, host)
        tunnel.ipv6_only = _is_any6(host) and self.server.ports.ipv6_only_for(owner.credential, host)
        if policy is None:
            tunnel.port = self._listen(tunnel, host, 0)
            try:
                tunnel.claim = self.claims.claim(UdpPort(*tunnel.key), owner, tunnel_id).claim
            except ClaimRefused:
                tunnel.port.stopListening()
                raise BindRefused("in_use", f"no free UDP port on {host}; try again") from None
            self.tunnels[tunnel.key] = tunnel
            return tunnel
        tried = 0
        for lo, hi in policy.ports:
            for candidate in range(lo, hi + 1):
                name = UdpPort(host, candidate)
                if self.claims.holder(name) is not None:
                    continue
                if tried >= PICK_PORT_ATTEMPTS:
                    break
                tried += 1
                claim = self.claims.claim(name, owner, tunnel_id).claim
                tunnel.claim = claim
                try:
                    tunnel.port = self._listen(tunnel, host, candidate)
                except BindRefused as refusal:
                    self.claims.release(claim, hand_on=False)
                    tunnel.claim = None
                    if refusal.code != "in_use":
                        raise
                    continue
                self.tunnels[tunnel.key] = tunnel
                return tunnel
        raise BindRefused(
            "in_use",
            f"no free UDP port for client {policy.name} in {policy.describe_ports()} on {host}; "
            "close a tunnel or ask for more ports",
        )

    def _listen(self, tunnel: UdpTunnel, host: str, port: int) -> IListeningPort:
        reactor = self.server.reactor
        adopted = self.adopt(host, port, tunnel) if self.adopt is not None and port else None
        if adopted is not None:
            return adopted
        try:
            listening = listen_udp(reactor, port, tunnel, host, MAX_DATAGRAM, DATAGRAMS_PER_TURN)
        except error.CannotListenError as e:
            raise listen_refused(e, host, port, udp=True) from None
        skt = getattr(listening, "socket", None)
        if skt is not None:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    skt.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
                except OSError:
                    pass
        return listening

    def _hand_over(
        self, tunnel: UdpTunnel, claim: Claim[ServerSession], previous_claim: Claim[ServerSession],
    ) -> None:
        """A newer session of the credential took the port: its flows are
        forgotten (their ids were the old session's); the old one is told."""
        previous = previous_claim.holder
        old_tunnel = previous_claim.tag if previous.udp_tunnels.pop(previous_claim.tag, None) is not None else None
        tunnel.forget_flows("handed to a newer session")
        tunnel.claim = claim
        self.log.info(
            "UDP port {port} handed to a newer session of {credential}", port=tunnel.key[1],
            event="port_handed_back", host=tunnel.host, credential=claim.holder.credential,
            session=claim.holder.id[:8], previous=previous.id[:8], kind="udp",
        )
        if previous is not claim.holder and old_tunnel is not None:
            previous.lost_udp_port(tunnel, old_tunnel)
        if not previous.tunnels and not previous.udp_tunnels and not previous.attached:
            previous.expire("its owner started a new session")

    def let_go(self, tunnel: UdpTunnel) -> None:
        """Its holder no longer wants `tunnel`: the newest waiting session of
        the credential gets it, else it is closed."""
        claim = tunnel.claim
        if claim is None or tunnel.port is None:
            self.release(tunnel)
            return
        heir_claim = self.claims.release(claim, hand_on=not self.shutting_down)
        if heir_claim is None:
            self.release(tunnel)
            return
        tunnel.forget_flows("handed over")
        tunnel.claim = heir_claim
        heir = heir_claim.holder
        self.log.info(
            "UDP port {port} handed over to session {id}, which waited for it", port=tunnel.key[1],
            id=heir.id[:8], event="port_handed_over", host=tunnel.host, credential=heir.credential,
            session=heir.id[:8], previous=claim.holder.id[:8], kind="udp",
        )
        heir.took_udp_port(tunnel, heir_claim.tag, tunnel.key[1])

    def release(self, tunnel: UdpTunnel) -> defer.Deferred[None]:
        """Close a public UDP port and give up its claim, to nobody."""
        claim, tunnel.claim = tunnel.claim, None
        if claim is not None:
            self.claims.release(claim, hand_on=False)
        if tunnel.port is not None:
            self.tunnels.pop(tunnel.key, None)
        return tunnel.stop()

    def close_all(self) -> list[defer.Deferred[None]]:
        self.shutting_down = True
        return [self.release(tunnel) for tunnel in list(self.tunnels.values())]


def _is_any6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host) == ipaddress.IPv6Address("::")
    except ValueError:
        return False
