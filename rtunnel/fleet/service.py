"""A fleet member, wired: the etcd client, the member's lease, the
directory, the claims registry, and what connects them to a TunnelServer.

`Fleet.start()` registers the member (and reads the fleet) before the
server accepts clients; the TunnelServer gets `fleet.claims` through its
`claims=` seam; `attach(server)` connects the rest (lost claims close
their ports, fencing pauses the public ports, sessions are published);
`start_links()` starts its member links (rtunnel.fleet.links: the edge
listeners of names held elsewhere, and the listener for other members'
links) with the member's certificate; `stop_links()` closes them (before
the server shuts down); `stop()` revokes the lease, so a clean stop frees
the member's claims at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from rtunnel.addresses import IPV4_ANY
from rtunnel.config import ServerConfig
from rtunnel.errors import ConfigError
from rtunnel.fleet.ca import MemberIdentity, member_identity
from rtunnel.fleet.claims import FleetClaims, fleet_serials
from rtunnel.fleet.directory import FleetDirectory
from rtunnel.fleet.etcd import EtcdClient, EtcdError
from rtunnel.fleet.etcdtls import load_etcd_tls
from rtunnel.fleet.keys import DEFAULT_HOST
from rtunnel.fleet.members import FleetMember
from rtunnel.server.claims import Claim, ClaimRefused, Hostname, Name, TcpPort, UdpPort
from rtunnel.server.visitors import PublicListener

if TYPE_CHECKING:
    from rtunnel.fleet.drain import Drain
    from rtunnel.server import TunnelServer
    from rtunnel.server.session import ServerSession

FIRST_SNAPSHOT_TIMEOUT = 10.0


def _split_endpoint(description: str) -> list[str]:
    """A Twisted endpoint string's fields (split at ':' not escaped by '\\')."""
    fields, current, escaped = [], "", False
    for char in description:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append(current)
            current = ""
        else:
            current += char
    fields.append(current)
    return fields


def link_client_endpoint(listen: str | None, fallback_host: str) -> str:
    """The client endpoint string other members dial for a member link
    listening on `listen` (a server endpoint string, e.g.
    tcp:19060:interface=127.0.0.2 -> tcp:host=127.0.0.2:port=19060); on
    all addresses, `fallback_host`. "" if there is none or it is not TCP."""
    if not listen:
        return ""
    fields = _split_endpoint(listen)
    kind, args = fields[0], fields[1:]
    if kind not in ("tcp", "tcp6") or not args:
        return ""
    named = dict(arg.split("=", 1) for arg in args if "=" in arg)
    positional = [arg for arg in args if "=" not in arg]
    port = named.get("port") or (positional[0] if positional else "")
    host = named.get("interface") or (positional[2] if len(positional) > 2 else "")
    if not port.isdigit() or port == "0":
        return ""
    if host in ("", "0.0.0.0", "::"):
        host = fallback_host
    return f"tcp:host={host.replace(':', chr(92) + ':')}:port={port}"


class _ObservedSessions(dict):
    """TunnelServer.sessions that tells the fleet when a session starts
    and ends (so that `sessions/<id>` follows them) without a hook in the
    server: the server adds with `[id] = session` and removes with `pop`."""

    def __init__(self, fleet: Fleet) -> None:
        super().__init__()
        self.fleet = fleet

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.fleet.session_started(value)

    def pop(self, key: str, *default: Any) -> Any:
        present = key in self
        value = super().pop(key, *default)
        if present:
            self.fleet.session_ended(key)
        return value


class LinkDirectory:
    """The directory as the member links name things (rtunnel.fleet.links):
    a port on this member's default address is `TcpPort("default", port)`
    there (an edge sends that in OPEN, and every member serves it on its
    own --public-host), where FleetDirectory names it on this member's
    --public-host. Everything else passes through."""

    def __init__(self, directory: FleetDirectory, default_hosts: frozenset[str]) -> None:
        self.directory = directory
        self.member = directory.member
        self.default_hosts = default_hosts

    def _to_link(self, name: Name) -> Name:
        if isinstance(name, TcpPort | UdpPort) and name.host in self.default_hosts:
            return type(name)(DEFAULT_HOST, name.port)
        return name

    def _from_link(self, name: Name) -> Name:
        if isinstance(name, TcpPort | UdpPort) and name.host == DEFAULT_HOST:
            return type(name)(self.directory.public_host, name.port)
        return name

    def link_endpoint(self, member: str) -> str | None:
        return self.directory.link_endpoint(member)

    def home_of(self, name: Name) -> str | None:
        return self.directory.home_of(self._from_link(name))

    def claim_kind(self, name: Name) -> str:
        return self.directory.claim_kind(name)

    def remote_names(self) -> Iterable[tuple[Name, str]]:
        return [(self._to_link(name), home) for name, home in self.directory.remote_names()]

    def watch_names(self, callback: Callable[[Name, str | None], None]) -> None:
        self.directory.watch_names(lambda name, home: callback(self._to_link(name), home))

    def session_home(self, session_id: str) -> str | None:
        return self.directory.session_home(session_id)

    @property
    def fenced(self) -> bool:
        return self.directory.fenced


def host_name(claim: Claim[Any]) -> str:
    """The hostname a hostname claim is for ("" for other kinds)."""
    return claim.name.name if isinstance(claim.name, Hostname) else ""


class Fleet:
    """This server as one member of a fleet."""

    log = Logger()

    def __init__(self, reactor: Any, config: ServerConfig, control: str = "") -> None:
        self.reactor = reactor
        self.config = config
        self.prefix = config.fleet_prefix
        self.name = config.fleet_member
        tls = load_etcd_tls(config.fleet_etcd, config.fleet_etcd_ca, config.fleet_etcd_cert, config.fleet_etcd_key)
        self.etcd = EtcdClient(reactor, config.fleet_etcd, timeout=min(2.0, config.fleet_lease_ttl / 3), tls=tls)
        self.member = FleetMember(
            reactor, self.etcd, self.prefix, self.name,
            {
                "link": link_client_endpoint(config.fleet_listen, config.public_host),
                "control": control, "public_host": config.public_host,
            },
            ttl=config.fleet_lease_ttl,
        )
        self.directory = FleetDirectory(self.etcd, self.prefix, self.name, config.public_host)
        self.drain: Drain | None = None  # set once the control port is open (rtunnel.tap.server)
        self.directory.is_fenced = lambda: self.member.fenced
        default_hosts = {config.public_host}
        if config.public_host == "::":  # PublicPorts.bind_default falls back to 0.0.0.0
            default_hosts.add(IPV4_ANY)
        self.claims: FleetClaims[ServerSession] = FleetClaims(
            reactor, self.etcd, self.prefix, self.member, self.directory, frozenset(default_hosts),
        )
        self.default_hosts = frozenset(default_hosts)
        self.server: TunnelServer | None = None
        #: the member's certificate for member links (None without --fleet-listen: no member links)
        self.identity: MemberIdentity | None = None
        self.links: Any = None  # rtunnel.fleet.links.FleetLinks, once start_links() ran
        self.hosts: Any = None  # rtunnel.fleet.hostedge.HostEdge, with --http/--https and member links
        self.udp_edge: Any = None  # rtunnel.fleet.udpedge.UdpEdge, with member links
        self._paused: dict[str, Any] = {}  # claim key -> its listening port, not accepting while fenced
        self.member.on_fence.append(self._fenced)
        self.claims.on_confirmed.append(self._confirmed)
        self.member.on_new_lease.append(lambda _: self._republish_sessions())

    @defer.inlineCallbacks
    def start(self) -> Any:
        """Read the fleet, then register: the member serves nothing before both.
        The member certificate is read first: a member that could not make
        member links never joins."""
        if self.config.fleet_listen:
            config = self.config
            self.identity = member_identity(
                config.state_dir, self.name, config.fleet_cert, config.fleet_key, config.fleet_ca,
            )
        else:
            self.log.warn(
                "fleet member {name} has no --fleet-listen: it makes no member links, so visitors reach "
                "its tunnels only at this member and it serves no tunnel of another member; give "
                "--fleet-listen tcp:PORT:interface=ADDRESS (and its member certificate) to serve every tunnel",
                name=self.name, event="fleet_no_links",
            )
        try:
            yield self.member.start()
        except EtcdError as e:
            raise EtcdError(
                f"cannot join the fleet: {e}. Start etcd (apt install etcd-server) or correct --fleet-etcd",
                e.url,
            ) from None
        self.directory.start()
        synced = self.directory.when_synced()
        synced.addTimeout(FIRST_SNAPSHOT_TIMEOUT, self.reactor)
        yield synced
        self.log.info(
            "fleet member {name} joined: {n} member(s), {claims} claim(s) in the fleet",
            name=self.name, n=len(self.directory.members), claims=len(self.directory.claims),
            event="fleet_joined", members=sorted(self.directory.members),
        )

    def attach(self, server: TunnelServer) -> None:
        """Connect the fleet to `server` (made with claims=self.claims)."""
        self.server = server
        server.fleet = self  # the admin API's "fleet" (describe())
        server.session_serials = fleet_serials()
        observed = _ObservedSessions(self)
        observed.update(server.sessions)
        server.sessions = observed
        self.claims.on_lost = self._lost

    @defer.inlineCallbacks
    def start_links(self) -> Any:
        """Member links (after attach()): listen on --fleet-listen for other
        members' links and serve every name held elsewhere at this edge."""
        from rtunnel.fleet.links import FleetLinks

        if self.identity is None or self.server is None or not self.config.fleet_listen:
            return None
        self.links = FleetLinks(
            self.reactor, self.server, LinkDirectory(self.directory, self.default_hosts), self.identity,
            self.config.fleet_listen,
        )
        try:
            port = yield self.links.start()
        except CannotListenError as e:
            self.links = None
            raise ConfigError(
                f"cannot listen for member links on --fleet-listen {self.config.fleet_listen}: "
                f"{e.socketError}. Choose another --fleet-listen port or stop the program using it"
            ) from None
        from rtunnel.fleet.udpedge import UdpEdge

        self.udp_edge = UdpEdge(self.links)
        self.log.info(
            "fleet member {name}: member links on {listen}, serving {n} name(s) held at other members",
            name=self.name, listen=self.config.fleet_listen, n=len(self.links.forwards),
            event="fleet_links_listening",
        )
        return port

    def serve_hostnames(self, edge: Any) -> None:
        """This member's HTTP edge (rtunnel.server.httpedge.HttpEdge) serves the
        hostnames held at other members too, and takes their visitors carried
        here from other edges (rtunnel.fleet.hostedge)."""
        from rtunnel.fleet.hostedge import HostEdge

        if self.links is not None:
            self.hosts = HostEdge(self.links, edge)

    def stop_links(self) -> defer.Deferred[None]:
        """Close the member links and edge listeners (before the server shuts down)."""
        udp_edge, self.udp_edge = self.udp_edge, None
        if udp_edge is not None:
            udp_edge.stop()
        hosts, self.hosts = self.hosts, None
        if hosts is not None:
            hosts.stop()
        links, self.links = self.links, None
        return links.stop() if links is not None else defer.succeed(None)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """Leave the fleet: revoke the lease (every key of ours goes at once)."""
        yield self.stop_links()
        self.claims.stop()
        self.directory.stop()
        yield self.member.stop()
        yield self.etcd.close()

    # ------------------------------------------------------------ what the admin API shows

    def describe(self) -> dict[str, Any]:
        """The fleet as this member sees it (GET /api/fleet, the status
        page's "Fleet" section; docs/admin.md): the members up (registered
        under a live lease), this member and whether it is fenced, every
        claim with its home, the names served here for other members, the
        visitors this member carries and the member links' bytes."""
        directory, links = self.directory, self.links
        members = []
        for name, info in sorted(directory.members.items()):
            members.append({
                "name": name, "this": name == self.name, "control": info.get("control"),
                "link": info.get("link"), "public_host": info.get("public_host"), "pid": info.get("pid"),
                "started": info.get("started"),
            })
        claims = []
        for key, (record, _) in sorted(directory.claims.items()):
            kind, _, rest = key.removeprefix("claims/").partition("/")
            claims.append({
                "key": key, "kind": kind, "name": rest, "home": record.member, "here": record.member == self.name,
                "credential": record.credential, "session": record.session[:8],
            })
        link_rows: dict[str, dict[str, Any]] = {}
        edge_names: list[dict[str, Any]] = []
        forwarded = {"now": 0, "to_home": {}, "from_edge": {}}
        if links is not None:
            for (member, direction), n in links.link_bytes().items():
                row = link_rows.setdefault(member, {"member": member, "up": [], "bytes_in": 0, "bytes_out": 0})
                row["bytes_" + direction] += n
            for member, direction, _ in links.live_links():
                row = link_rows.setdefault(member, {"member": member, "up": [], "bytes_in": 0, "bytes_out": 0})
                row["up"].append(direction)
            for forward in list(links.forwards.values()):
                edge_names.append({"name": forward.name.describe(), "home": forward.home,
                                   "listening": forward.port is not None})
            if self.hosts is not None:
                for name, tunnel in sorted(self.hosts.remote.items()):
                    edge_names.append({"name": f"hostname {name} ({tunnel.kind})", "home": tunnel.home,
                                       "listening": True})
            if self.udp_edge is not None:
                for port in list(self.udp_edge.ports.values()):
                    edge_names.append({"name": port.name.describe(), "home": port.home,
                                       "listening": port.port is not None, "flows": len(port.flows),
                                       "drops": dict(port.drops)})
            forwarded = {
                "now": links.forwarded_visitors, "to_home": dict(links.visitors_forwarded),
                "from_edge": dict(links.visitors_received),
            }
        return {
            "member": self.name, "fenced": self.member.fenced, "lease": f"{self.member.lease:x}" if self.member.lease else None,
            "links_listen": self.config.fleet_listen, "members": members, "claims": claims,
            "edge_names": edge_names, "visitors": forwarded,
            "member_links": [link_rows[m] for m in sorted(link_rows)],
        }

    # ------------------------------------------------------------ claims lost, fencing

    def _lost(self, claim: Claim[ServerSession], code: str) -> None:
        """Another member holds `claim`'s name now: close our port and tell
        the session, as a takeover on one server does."""
        server, session = self.server, claim.holder
        if server is None:
            return
        listener = session.tunnels.get(claim.tag)
        if listener is None or listener.claim is not claim:
            udp = session.udp_tunnels.get(claim.tag)
            host = session.hostnames.get(claim.tag)
            if udp is not None and udp.claim is claim:
                # a UDP port: its socket closes (the edge of the new home may open the port here)
                session.udp_tunnels.pop(claim.tag, None)
                server.udp.release(udp)
            elif host is not None and host.claim is claim:
                # a hostname: no longer routed here (this member's HTTP edge sends it to the new home)
                session.hostnames.pop(claim.tag, None)
                host.claim = None
                if server.hostnames.tunnels.get(host_name(claim)) is host:
                    del server.hostnames.tunnels[host_name(claim)]
            else:
                return
        elif isinstance(listener, PublicListener):
            session.tunnels.pop(claim.tag, None)
            server.ports.release(listener)
        else:  # another kind's listener: it closes itself the same way, if it can
            session.tunnels.pop(claim.tag, None)
            closing = getattr(listener, "close", None)
            if callable(closing):
                closing()
        if code == ClaimRefused.TAKEN_OVER:
            session._bind_failed(  # noqa: SLF001
                claim.tag, "taken_over",
                f"{claim.name.describe()} was taken over by a newer session of client {session.credential} "
                "at another fleet member; this client keeps asking for it and gets it back when that "
                "session lets go of it",
            )
        else:
            session._bind_failed(  # noqa: SLF001
                claim.tag, "in_use",
                f"{claim.name.describe()} is held by another client now (this fleet member lost its etcd "
                "lease meanwhile); choose another port, or try again",
            )
        if not session.tunnels and not session.udp_tunnels and not session.hostnames and not session.attached:
            session.expire("its ports are held at another fleet member")

    def _fenced(self, fenced: bool) -> None:
        """Fenced: accept no new visitors on our public ports (they wait in
        the listen queue). Unfenced: accept again on each port whose claim
        etcd holds for us (after a lost lease: once it is claimed again)."""
        server = self.server
        if server is None:
            return
        if fenced:
            for listener in server.listeners.values():
                port, claim = listener.port, listener.claim
                if port is not None and claim is not None and hasattr(port, "stopReading"):
                    port.stopReading()
                    self._paused[self.claims.key(claim.name)] = port
            return
        for key in [key for key in self._paused if self._key_confirmed(key)]:
            self._resume(key)
        if self.directory.watch is not None:
            self.directory.watch.restart()  # the stream may have died silently meanwhile

    def _key_confirmed(self, key: str) -> bool:
        return key in self.claims._published  # noqa: SLF001

    def _confirmed(self, key: str) -> None:
        """etcd holds `key` for us again: its port may accept visitors."""
        if key in self._paused and not self.member.fenced:
            self._resume(key)

    def _resume(self, key: str) -> None:
        port = self._paused.pop(key)
        if getattr(port, "connected", False):  # still listening (not released meanwhile)
            port.startReading()

    # ------------------------------------------------------------ sessions/<id>

    def _session_value(self) -> bytes:
        return json.dumps({"member": self.name}).encode()

    def session_started(self, session: ServerSession) -> None:
        self._put_session(session.id, session.credential)

    def _put_session(self, session_id: str, credential: str) -> None:
        if not self.member.lease:
            return
        value = json.dumps({"member": self.name, "credential": credential}).encode()
        d = self.etcd.put(f"{self.prefix}sessions/{session_id}", value, self.member.lease)
        d.addErrback(lambda f: self.log.warn(
            "could not publish session {id} in etcd: {why}", id=session_id[:8], why=f.getErrorMessage(),
            event="fleet_session_publish_failed",
        ))

    def session_ended(self, session_id: str) -> None:
        d = self.etcd.delete(f"{self.prefix}sessions/{session_id}")
        d.addErrback(lambda f: None)  # it goes with our lease anyway

    def _republish_sessions(self) -> None:
        if self.server is not None:
            for session in list(self.server.sessions.values()):
                self._put_session(session.id, session.credential)
