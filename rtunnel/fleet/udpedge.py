"""UDP ports at every member (docs/fleet.md "UDP ports at every member").

A member that is not the home of a UDP port (the member whose client
session holds `claims/udp/...`) is its edge: it opens the port too (a port
bound without an address on its own --public-host) and carries each
visitor flow's datagrams to the home over the member link, as DATAGRAM
frames: never reliable, never queued (a datagram the link cannot take now
is dropped, as on any UDP tunnel), bounded per flow and per link by the
mux's datagram shares.

On the member link, each UDP name an edge serves is a *channel*: a stream
the edge opens (OPEN `name` `{"kind": "udp", ...}`, `"channel": N`) and the
home accepts by writing one byte (CHANNEL_READY) on it; the DATAGRAM
frames' tunnel id is N, their flow id the edge's flow, and the first
datagram of a flow on a channel carries the visitor's address. The home
feeds them to its own UDP tunnel as if received on its socket (the client
sees the visitor's real address) and sends the client's replies back on
the same channel and flow (rtunnel.server.udp `UdpTunnel.carried`).
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from typing import Any

from twisted.internet import error
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from rtunnel import wire
from rtunnel.addresses import format_host_port, unmap
from rtunnel.fleet.links import DEFAULT_HOST, FleetLinks
from rtunnel.fleet.memberlink import name_to_json
from rtunnel.mux import Session, SessionBufferFull, Stream, StreamIdsExhausted
from rtunnel.server.claims import Name, UdpPort
from rtunnel.server.udp import DATAGRAMS_PER_TURN, MAX_DATAGRAM, UdpTunnel
from rtunnel.udpport import listen_udp
from rtunnel.wire import ResetCode

#: The home's answer on a channel stream: it serves the name; datagrams may flow.
CHANNEL_READY = b"\x01"
#: How often, and how many times, an edge tries again to open a UDP port
#: still held by this member's own closing socket.
LISTEN_RETRY_DELAY = 0.2
LISTEN_RETRIES = 10


class ChannelEnd:
    """The LocalPort of a channel stream (either end): no socket behind it;
    bytes go to `on_data`, its end to `on_end`."""

    def __init__(self, on_data: Any, on_end: Any) -> None:
        self.on_data = on_data
        self.on_end = on_end
        self.stream: Stream | None = None

    def bind(self, stream: Stream) -> None:
        self.stream = stream

    def write(self, data: bytes) -> None:
        self.on_data(data)

    def half_close(self) -> None:
        if self.stream is not None and not self.stream.closed:
            self.stream.local_eof()

    def abort(self) -> None:
        self.on_end()

    def close(self) -> None:
        self.on_end()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@dataclass(slots=True)
class EdgeFlow:
    """One visitor address of a UDP port served at this edge."""

    id: int
    address: tuple[str, int]
    last_seen: float
    told: Stream | None = None  # the channel stream its address was sent on


class EdgeUdpPort(DatagramProtocol):
    """A UDP port held at another member, open here: its flows' datagrams
    go over the member link to the home, the replies come back here."""

    log = Logger()
    noisy = False

    def __init__(self, udp: UdpEdge, name: UdpPort, home: str, host: str, channel: int) -> None:
        self.udp = udp
        self.name = name  # as the member links name it (host "default": each member's --public-host)
        self.home = home
        self.host = host
        self.channel = channel
        self.port: Any = None
        self.stream: Stream | None = None  # the channel stream on the link to the home
        self.session: Session | None = None
        self.ready = False
        self.flows: dict[tuple[str, int], EdgeFlow] = {}
        self.by_id: dict[int, EdgeFlow] = {}
        self._next_flow = 1
        self.drops: Counter[str] = Counter()
        self.datagrams_in = self.datagrams_out = 0
        self._sweep: Any = None

    # ------------------------------------------------------------ the channel

    def open_channel(self, session: Session) -> None:
        """Open this port's channel on `session` (the link to the home)."""
        if self.session is session and self.stream is not None and not self.stream.closed:
            return
        self.close_channel()
        self.session = session
        links = self.udp.links
        where = [self.host, self.name.port]
        info = {"name": name_to_json(self.name), "src": where, "dst": where, "edge": links.member,
                "channel": self.channel}
        try:
            stream = session.open_stream(0, info)
        except (SessionBufferFull, StreamIdsExhausted):
            return
        self.stream = stream
        stream.attach_local(ChannelEnd(self._channel_data, functools.partial(self._channel_ended, stream)))

    def _channel_data(self, data: bytes) -> None:
        if CHANNEL_READY in data:
            self.ready = True

    def _channel_ended(self, stream: Stream) -> None:
        if self.stream is stream:
            self.stream = None
            self.ready = False

    def close_channel(self) -> None:
        stream, self.stream = self.stream, None
        self.ready = False
        if stream is not None and not stream.closed:
            stream.reset(ResetCode.ABORTED, "this edge no longer serves the port for that home")

    def rehome(self, home: str) -> None:
        """The port moved to `home`: its flows' datagrams go there from now on."""
        if home == self.home:
            return
        self.close_channel()
        self.home = home
        self.session = None
        session = self.udp.links.peer(home).session
        if session is not None:
            self.open_channel(session)

    # ------------------------------------------------------------ visitor -> home

    def read_done(self) -> None:
        """The end of one read of the socket (rtunnel.udpport.ReadPort): each
        datagram went to the member link as it came."""

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        address = (unmap(addr[0]), addr[1])
        flow = self.flows.get(address)
        now = self.udp.links.reactor.seconds()
        if flow is None:
            limit = self.udp.links.server.config.udp_max_flows
            if len(self.flows) >= limit or self._next_flow > wire.MAX_U32:
                self.drops["flow_limit"] += 1
                return
            flow = EdgeFlow(self._next_flow, address, now)
            self._next_flow += 1
            self.flows[address] = self.by_id[flow.id] = flow
            self._schedule_sweep()
        flow.last_seen = now
        session = self.udp.links.peer(self.home).session
        if session is None:
            self.drops["link_down"] += 1
            return
        if self.session is not session or self.stream is None:
            self.open_channel(session)
        if not self.ready or self.stream is None:
            self.drops["channel_opening"] += 1
            return
        stream = self.stream
        dropped = session.send_datagram(self.channel, flow.id, data, address if flow.told is not stream else None)
        if dropped is not None:
            self.drops[dropped] += 1
            return
        flow.told = stream
        self.datagrams_in += 1

    # ------------------------------------------------------------ home -> visitor

    def reply(self, flow_id: int, payload: bytes) -> None:
        flow = self.by_id.get(flow_id)
        if flow is None or self.transport is None:
            self.drops["unknown_flow"] += 1
            return
        flow.last_seen = self.udp.links.reactor.seconds()
        try:
            self.transport.write(payload, flow.address)
        except (OSError, error.MessageLengthError):
            self.drops["socket_error"] += 1
            return
        self.datagrams_out += 1

    # ------------------------------------------------------------ flows' lives

    def _schedule_sweep(self) -> None:
        if self._sweep is None or not self._sweep.active():
            idle = self.udp.links.server.config.udp_idle_timeout
            self._sweep = self.udp.links.reactor.callLater(max(idle / 4, 0.05), self.sweep)

    def sweep(self) -> None:
        """Forget flows idle for --udp-idle-timeout; again later while any live."""
        self._sweep = None
        now = self.udp.links.reactor.seconds()
        idle = self.udp.links.server.config.udp_idle_timeout
        for address, flow in list(self.flows.items()):
            if now - flow.last_seen >= idle:
                del self.flows[address]
                del self.by_id[flow.id]
        if self.flows:
            self._schedule_sweep()

    def stop(self) -> Any:
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        self.flows.clear()
        self.by_id.clear()
        self.close_channel()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


class HomeChannel:
    """At the home: one edge's channel of one of our UDP ports."""

    def __init__(self, udp: UdpEdge, session: Session, channel: int, name: UdpPort, edge: str) -> None:
        self.udp = udp
        self.session = session
        self.channel = channel
        self.name = name
        self.edge = edge
        self.addresses: dict[int, tuple[str, int]] = {}  # the edge's flow id -> the visitor's address
        self.tunnel: UdpTunnel | None = None

    def local_tunnel(self) -> UdpTunnel | None:
        tunnel = self.tunnel
        if tunnel is None or tunnel.claim is None or tunnel.port is None:
            tunnel = self.tunnel = self.udp.local_tunnel(self.name)
        return tunnel

    def datagram(self, datagram: wire.Datagram) -> None:
        if datagram.address is not None:
            self.addresses.pop(datagram.flow, None)
            self.addresses[datagram.flow] = datagram.address
            if len(self.addresses) > self.udp.links.server.config.udp_max_flows:  # the oldest goes
                del self.addresses[next(iter(self.addresses))]
        address = self.addresses.get(datagram.flow)
        tunnel = self.local_tunnel()
        if address is None or tunnel is None:
            self.udp.home_drops["unknown_flow" if tunnel is not None else "not_held"] += 1
            return
        tunnel.carried[address] = functools.partial(self.reply, datagram.flow)
        tunnel.datagramReceived(datagram.payload, address)
        tunnel.read_done()  # as a read of its own socket ends: what it holds goes to the link now

    def reply(self, flow_id: int, payload: bytes) -> None:
        dropped = self.session.send_datagram(self.channel, flow_id, payload)
        if dropped is not None:
            self.udp.home_drops[dropped] += 1


class UdpEdge:
    """UDP ports held at other members, served here; and the channels
    other edges open here for the UDP ports held here."""

    log = Logger()

    def __init__(self, links: FleetLinks) -> None:
        self.links = links
        self.ports: dict[Name, EdgeUdpPort] = {}
        self.channels: dict[int, EdgeUdpPort] = {}
        self._next_channel = 1
        self.home_channels: dict[tuple[Session, int], HomeChannel] = {}
        self.home_drops: Counter[str] = Counter()
        self.stopping = False
        links.kinds[UdpPort] = self
        links.datagrams_out = self.reply
        links.datagrams_in = self.home_datagram
        links.on_link_up.append(self.link_up)
        links.server.udp.adopt = self.hand_over
        for name, home in list(links.directory.remote_names()):
            if isinstance(name, UdpPort):
                self.moved(name, home)

    def stop(self) -> None:
        self.stopping = True
        if self.links.server.udp.adopt == self.hand_over:
            self.links.server.udp.adopt = None
        for port in list(self.ports.values()):
            port.stop()
        self.ports.clear()
        self.channels.clear()

    # ------------------------------------------------------------ the edge

    def moved(self, name: Name, home: str | None) -> None:
        """The directory says UDP port `name` is held at `home` now (None: released)."""
        assert isinstance(name, UdpPort)
        if self.stopping:
            return
        port = self.ports.get(name)
        if home is None or home == self.links.member or home in self.links.siblings:
            if port is not None:
                self._unserve(port)
            return
        if port is not None:
            port.rehome(home)
            return
        host = self.links.server.config.public_host if name.host == DEFAULT_HOST else name.host
        channel, self._next_channel = self._next_channel, self._next_channel + 1
        port = EdgeUdpPort(self, name, home, host, channel)
        self.ports[name] = port
        self.channels[channel] = port
        self._listen(port, LISTEN_RETRIES)

    def _listen(self, port: EdgeUdpPort, retries: int) -> None:
        if self.stopping or self.ports.get(port.name) is not port:
            return
        try:
            # read as the home's own port is (so that the session that may adopt it reads it so too)
            port.port = listen_udp(
                self.links.reactor, port.name.port, port, port.host, MAX_DATAGRAM, DATAGRAMS_PER_TURN,
            )
        except error.CannotListenError as e:
            if retries > 0:  # our own socket of the port may still be closing
                self.links.reactor.callLater(LISTEN_RETRY_DELAY, self._listen, port, retries - 1)
                return
            self._forget(port)
            self.log.warn(
                "cannot serve {name} (held at member {home}) here on {address}: {why}; visitors must "
                "reach it at another member", name=port.name.describe(), home=port.home,
                address=format_host_port(port.host, port.name.port), why=str(e.socketError),
                event="edge_listen_failed", member=port.home,
            )
            return
        session = self.links.peer(port.home).session  # dialled now if it was not
        if session is not None:
            port.open_channel(session)
        self.log.info(
            "serving {name} here for member {home}", name=port.name.describe(), home=port.home,
            event="edge_serving", member=port.home, host=port.host, port=port.name.port,
        )

    def hand_over(self, host: str, number: int, tunnel: UdpTunnel) -> Any:
        """UdpPorts.adopt: a session of this member binds `host:number`, which
        this member serves as an edge (its client moved here): the socket
        goes to the session's tunnel at once, never closed and bound again
        (it could not be bound while the edge holds it)."""
        for port in list(self.ports.values()):
            listening = port.port
            if listening is None or port.host != host or port.name.port != number:
                continue
            port.port = None
            self._forget(port)
            port.stop()
            port.doStop()
            listening.protocol = tunnel  # rtunnel.udpport.ReadPort: whom its datagrams (and read_done) go to
            tunnel.makeConnection(listening)
            self.log.info(
                "{name}, served here for member {home}, is now this member's own", name=port.name.describe(),
                home=port.home, event="edge_adopted", member=port.home, host=host, port=number,
            )
            return listening
        return None

    def _forget(self, port: EdgeUdpPort) -> None:
        if self.ports.get(port.name) is port:
            del self.ports[port.name]
        self.channels.pop(port.channel, None)

    def _unserve(self, port: EdgeUdpPort) -> None:
        self._forget(port)
        port.stop()
        self.log.info(
            "no longer serving {name} here for member {home}", name=port.name.describe(), home=port.home,
            event="edge_stopped", member=port.home,
        )

    def link_up(self, home: str, session: Session) -> None:
        """A link to `home` is up: the channels of its ports, on it."""
        for port in list(self.ports.values()):
            if port.home == home and port.port is not None:
                port.open_channel(session)

    def reply(self, session: Session, datagram: wire.Datagram) -> None:
        """The home's datagram for one of our flows."""
        port = self.channels.get(datagram.tunnel)
        if port is None or port.session is not session:
            self.home_drops["unknown_channel"] += 1
            return
        port.reply(datagram.flow, datagram.payload)

    # ------------------------------------------------------------ the home

    def local_tunnel(self, name: UdpPort) -> UdpTunnel | None:
        """Our UDP tunnel of `name` (a default-address port: on any of our addresses)."""
        tunnels = self.links.server.udp.tunnels
        if name.host != DEFAULT_HOST:
            tunnel = tunnels.get((name.host, name.port))
            return tunnel if tunnel is not None and tunnel.claim is not None else None
        for (_host, number), tunnel in tunnels.items():
            if number == name.port and tunnel.claim is not None:
                return tunnel
        return None

    def arrived(
        self, hop: Stream, name: Name, src: list[Any], dst: list[Any], edge: str, info: dict[str, Any],
    ) -> None:
        """An edge opens a channel of one of our UDP ports."""
        assert isinstance(name, UdpPort)
        channel = info.get("channel")
        if not isinstance(channel, int) or isinstance(channel, bool) or not 0 < channel <= wire.MAX_U32:
            hop.reset(ResetCode.REFUSED, "a UDP channel needs a channel number (1 to 2^32-1)")
            return
        if self.local_tunnel(name) is None:
            hop.reset(ResetCode.REFUSED, f"{name.describe()} is not held at member {self.links.member}")
            return
        session = hop.session
        key = (session, channel)
        home = HomeChannel(self, session, channel, name, edge)
        self.home_channels[key] = home

        def ended() -> None:
            if self.home_channels.get(key) is home:
                del self.home_channels[key]

        hop.attach_local(ChannelEnd(lambda data: None, ended))
        hop.local_data(CHANNEL_READY)

    def home_datagram(self, session: Session, datagram: wire.Datagram, edge: str) -> None:
        """A datagram an edge carried here for one of our UDP ports."""
        home = self.home_channels.get((session, datagram.tunnel))
        if home is None:
            self.home_drops["unknown_channel"] += 1
            return
        home.datagram(datagram)
