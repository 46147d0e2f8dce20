"""Public TCP ports: the listeners a server opens for its clients' tunnels.

Who may hold a port is the claims registry's (rtunnel.server.claims): this
module checks a BIND against the credential's policy, asks the registry,
and opens, hands over or closes the listening socket that serves the name
(its visitors: rtunnel.server.visitors).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet import defer, error
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from rtunnel.addresses import IPV4_ANY, NO_IPV6_ERRNOS, format_host_port
from rtunnel.auth import ClientPolicy, format_ranges
from rtunnel.config import ServerConfig
from rtunnel.descriptors import DescriptorGate, listen_tcp
from rtunnel.server.claims import Claim, ClaimRefused, ClaimRegistry, TcpPort
from rtunnel.server.visitors import PublicListener
from rtunnel.tcp import port_number

if TYPE_CHECKING:
    from rtunnel.server.session import ServerSession

PICK_PORT_ATTEMPTS = 256  # ports tried in a client's ranges for "-f 0"


_T = TypeVar("_T")


class BindRefused(Exception):
    """A BIND the server refuses: `code` and `message` go to the client in
    BIND_FAILED."""

    def __init__(
        self, code: str, message: str, socket_errno: int | None = None, repeated: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.socket_errno = socket_errno  # of the failed listen, if that was the cause
        self.repeated = repeated  # the same refusal as last time (taken_over: a retry while waiting)


def listen_refused(e: error.CannotListenError, host: str, port: int, udp: bool = False) -> BindRefused:
    """The BindRefused for a public port the system would not let us open
    (TCP, or UDP with `udp`): what was wrong, and what the client can do."""
    code = getattr(e.socketError, "errno", None)
    kind, flag = ("UDP ", "udp:") if udp else ("", "")
    if code in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
        return BindRefused(
            "bad_address", f"this server has no IPv6, so it cannot bind {host}; "
            f"bind an IPv4 address (e.g. -f {flag}0.0.0.0:PORT)", code,
        )
    if code == errno.EACCES:
        return BindRefused(
            "not_permitted",
            f"the server process may not bind {kind}{host}:{port} (permission denied); choose a port above 1023",
        )
    if code == errno.EADDRNOTAVAIL:
        return BindRefused("bad_address", f"{host} is not an address of the server", code)
    return BindRefused(
        "in_use",
        f"{kind}port {port} on {host} is already in use by another program on the "
        f"server; choose another port (or -f {flag}0 to let the server pick one)",
    )


def dual_stack(listener: PublicListener) -> bool:
    """True if the listener's socket is on `::` and takes IPv4 visitors too
    (IPV6_V6ONLY off)."""
    skt = getattr(listener.port, "socket", None)
    if skt is None or skt.family != socket.AF_INET6:
        return False
    try:
        if ipaddress.ip_address(listener.host) != ipaddress.IPv6Address("::"):
            return False
        return skt.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    except (ValueError, OSError):
        return False


class PublicPorts:
    """Every public listener of the server: BIND's policy checks, the
    registry's verdict, and the sockets that follow from it."""

    log = Logger()

    def __init__(
        self, reactor: Any, config: ServerConfig, claims: ClaimRegistry[ServerSession],
        policy_for: Callable[[str], ClientPolicy | None], gate: DescriptorGate,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.claims = claims
        self.policy_for = policy_for
        self.gate = gate  # visitors never hold the descriptors kept for control connections
        self.listeners: dict[tuple[str, int], PublicListener] = {}
        # (host, port) -> waiters for a released port whose socket is not closed yet
        self._closing: dict[tuple[str, int], list[defer.Deferred[None]]] = {}
        self.shutting_down = False
        self._no_ipv6_logged = False
        #: a listening socket another part of the server already holds on
        #: (host, port), handed to `listener` instead of a new bind: a fleet
        #: member's edge listener for a name that becomes its own (rtunnel.fleet.links)
        self.adopt: Callable[[str, int, PublicListener], IListeningPort | None] | None = None

    # ------------------------------------------------------------ binding

    def bind_default(self, owner: ServerSession, tunnel_id: int, port: int) -> PublicListener:
        """BIND without a host (`-f 4000`): `::` (config.public_host), on
        Linux one dual-stack socket for IPv6 and IPv4 visitors, if the
        credential may bind it; else 0.0.0.0. Without IPv6 on this host,
        0.0.0.0 too (logged once)."""
        policy = self.policy_for(owner.credential)
        candidates = [self.config.public_host]
        if self.config.public_host != IPV4_ANY:
            candidates.append(IPV4_ANY)
        if policy is not None:
            allowed = [host for host in candidates if policy.permits_address(host)]
            if not allowed:
                raise BindRefused(
                    "not_permitted",
                    f"client {policy.name} may not bind the default address "
                    f"({' or '.join(candidates)}); it may bind {', '.join(policy.bind)}: "
                    f"forward one of them, e.g. -f {format_host_port(policy.bind[0], port)}",
                )
            candidates = allowed
        for host in candidates:  # the credential's own port (e.g. bound by an older client): hand it back
            if port and self.claims.owner(TcpPort(host, port)) == owner.credential:
                return self.bind(owner, tunnel_id, host, port)
        for host in candidates[:-1]:
            try:
                return self.bind(owner, tunnel_id, host, port)
            except BindRefused as refusal:
                if refusal.socket_errno not in NO_IPV6_ERRNOS:
                    raise
                if not self._no_ipv6_logged:
                    self._no_ipv6_logged = True
                    self.log.warn(
                        "cannot bind public ports on {host} ({why}): this host has no IPv6; "
                        "binding {fallback} instead (IPv4 only)",
                        host=host, why=refusal.message, fallback=candidates[-1],
                        event="ipv6_unavailable", listener="public",
                    )
        return self.bind(owner, tunnel_id, candidates[-1], port)

    def acquire(self, owner: ServerSession, tunnel_id: int, host: str, port: int) -> defer.Deferred[None] | None:
        """The registry's asynchronous part of claiming `host:port` (host ""
        the default address), to wait for before bind(): a fleet's etcd
        transaction. None if there is none: LocalClaims, port 0 (claimed
        once the system picked it), or a BIND refused anyway. Fails with
        BindRefused."""
        acquire = getattr(self.claims, "acquire", None)
        if acquire is None or port == 0 or self.shutting_down:
            return None
        if host:
            self._check_permitted(owner, host, port)
        d: defer.Deferred[None] = acquire(TcpPort(host or self.config.public_host, port), owner, tunnel_id)

        def refused(failure: Any) -> None:
            failure.trap(ClaimRefused)
            raise self._refusal(failure.value, owner)

        return d.addErrback(refused)

    def bind(self, owner: ServerSession, tunnel_id: int, host: str, port: int) -> PublicListener:
        """`host:port` as `owner`'s tunnel `tunnel_id` (port 0: one the
        server picks), or BindRefused saying why not."""
        if self.shutting_down:
            raise BindRefused("shutdown", "the server is shutting down; try again shortly")
        policy = self._check_permitted(owner, host, port)
        if port == 0:
            return self._bind_any(owner, tunnel_id, host, policy)
        name = TcpPort(host, port)
        held = self.listeners.get((host, port))
        holder = self.claims.holder(name)
        if (
            held is not None and holder is not None and holder.credential == owner.credential
            and holder.serial <= owner.serial and dual_stack(held) and self._ipv6_only(owner.credential, host)
        ):
            # its socket takes IPv4 visitors too, which the owner may no longer
            # bind (a reload): close it; the BIND is tried again once it is closed
            holder.tunnels.pop(held.tunnel_id, None)
            self.release(held)
            if not holder.tunnels and not holder.hostnames and not holder.attached:
                holder.expire("its owner started a new session")
            raise BindRefused(
                "in_use",
                f"port {port} on {host} is closing (it took IPv4 visitors too, which client "
                f"{owner.credential} may no longer bind); try again shortly",
            )
        try:
            claimed = self.claims.claim(name, owner, tunnel_id)
        except ClaimRefused as refusal:
            raise self._refusal(refusal, owner) from None
        if claimed.previous is not None:
            assert held is not None
            return self._take_over(held, claimed.claim, claimed.previous)
        listener = PublicListener(self.reactor, host)
        listener.claim = claimed.claim
        try:
            listener.port = self._listen(listener, owner.credential, host, port)
        except BindRefused:
            self.claims.release(claimed.claim, hand_on=False)
            raise
        self.listeners[listener.key] = listener
        return listener

    def _check_permitted(self, owner: ServerSession, host: str, port: int) -> ClientPolicy | None:
        """Raise BindRefused if the owner's credential may not bind
        `host:port` or has its most tunnels; return its policy."""
        policy = self.policy_for(owner.credential)
        if policy is None:
            if owner.tunnel_count >= self.config.max_tunnels:
                raise BindRefused(
                    "limit",
                    f"at most {self.config.max_tunnels} tunnels per session (--max-tunnels); close one first",
                )
            if not self.config.port_allowed(port):
                raise BindRefused(
                    "not_permitted",
                    f"port {port} is not permitted on this server (allowed: "
                    f"{format_ranges(self.config.allow_ports)}); choose a port in that range",
                )
            return None
        if port and not policy.permits_port(port):
            raise BindRefused(
                "not_permitted",
                f"port {port} is not permitted for client {policy.name} (allowed: "
                f"{policy.describe_ports()}); choose a port in that range",
            )
        if not policy.permits_address(host):
            raise BindRefused(
                "not_permitted",
                f"bind address {host} is not permitted for client {policy.name} (allowed: "
                f"{', '.join(policy.bind)})",
            )
        if owner.tunnel_count >= policy.max_tunnels:
            raise BindRefused(
                "limit",
                f"client {policy.name} may have at most {policy.max_tunnels} tunnels per session; close one first",
            )
        return policy

    def check_permitted(self, owner: ServerSession, host: str, port: int) -> ClientPolicy | None:
        """BIND's policy checks, for UDP ports too (rtunnel.server.udp):
        the same ports and addresses as TCP, the same tunnel count."""
        return self._check_permitted(owner, host, port)

    def ipv6_only_for(self, credential: str, host: str) -> bool:
        return self._ipv6_only(credential, host)

    @staticmethod
    def _refusal(refusal: ClaimRefused, owner: ServerSession) -> BindRefused:
        assert isinstance(refusal.name, TcpPort)
        port, host = refusal.name.port, refusal.name.host
        if refusal.code == ClaimRefused.TAKEN_OVER:  # an older session asks for a newer one's port: it waits
            return BindRefused(
                "taken_over",
                f"port {port} on {host} is held by a newer session of client {owner.credential} "
                "(another client with the same credential); this client gets it when that "
                "session lets go of it",
                repeated=refusal.repeated,
            )
        if refusal.code == ClaimRefused.UNAVAILABLE:
            return BindRefused(
                "unavailable",
                f"port {port} on {host} cannot be claimed now: this fleet member cannot reach etcd "
                f"({refusal}); try again shortly",
            )
        return BindRefused("in_use", f"port {port} on {host} is held by another client; choose another port")

    def _take_over(
        self, held: PublicListener, claim: Claim[ServerSession], previous_claim: Claim[ServerSession],
    ) -> PublicListener:
        """The newest session of a credential (e.g. its client restarted)
        took the port: hand the listener over; the previous holder is told
        and waits for it (the registry noted that)."""
        owner, previous = claim.holder, previous_claim.holder
        old_tunnel = previous_claim.tag if previous.tunnels.pop(previous_claim.tag, None) is not None else None
        self._hand_over(held, claim)
        host, port = held.key
        self.log.info(
            "port {port} handed to a newer session of {credential}", port=port,
            event="port_handed_back", host=host, credential=owner.credential, session=owner.id[:8],
            previous=previous.id[:8], previous_state=previous.state.value,
        )
        if previous is not owner and old_tunnel is not None:
            previous.lost_port(held, old_tunnel)
        if not previous.tunnels and not previous.hostnames and not previous.attached:
            previous.expire("its owner started a new session")
        return held

    def _bind_any(
        self, owner: ServerSession, tunnel_id: int, host: str, policy: ClientPolicy | None,
    ) -> PublicListener:
        """`-f 0`: a clients-file client gets a free port of its own ranges;
        others one the system picks."""
        listener = PublicListener(self.reactor, host)
        if policy is None:
            listener.port = self._listen(listener, owner.credential, host, 0)
            try:  # a port the system just gave out is claimed by nobody
                listener.claim = self.claims.claim(TcpPort(*listener.key), owner, tunnel_id).claim
            except ClaimRefused:
                listener.port.stopListening()
                raise BindRefused("in_use", f"no free port on {host}; try again") from None
        else:
            listener.port = self._listen_in_ranges(listener, owner, tunnel_id, policy, host)
        self.listeners[listener.key] = listener
        return listener

    def _listen_in_ranges(
        self, listener: PublicListener, owner: ServerSession, tunnel_id: int, policy: ClientPolicy, host: str,
    ) -> IListeningPort:
        tried = 0
        for lo, hi in policy.ports:
            for candidate in range(lo, hi + 1):
                name = TcpPort(host, candidate)
                if self.claims.owner(name) is not None:  # held here, or (a fleet) at another member
                    continue
                if tried >= PICK_PORT_ATTEMPTS:
                    break
                tried += 1
                try:
                    claim = self.claims.claim(name, owner, tunnel_id).claim  # free: granted (one server)
                except ClaimRefused as refusal:  # a fleet: taken meanwhile, or etcd out of reach
                    raise self._refusal(refusal, owner) from None
                listener.claim = claim
                try:
                    return self._listen(listener, owner.credential, host, candidate)
                except BindRefused as refusal:
                    self.claims.release(claim, hand_on=False)
                    listener.claim = None
                    if refusal.code != "in_use":
                        raise
        raise BindRefused(
            "in_use",
            f"no free port for client {policy.name} in {policy.describe_ports()} on {host}; "
            "close a tunnel or ask for more ports",
        )

    def _listen(self, listener: PublicListener, credential: str, host: str, port: int) -> IListeningPort:
        # (not for an IPv6-only port: the socket adopted may take IPv4 visitors too)
        if self.adopt is not None and port and not self._ipv6_only(credential, host):
            adopted = self.adopt(host, port, listener)
            if adopted is not None:
                return adopted
        try:
            # IPv6-only: an IPv6 address that never accepts IPv4 visitors
            ipv6_only = self._ipv6_only(credential, host)
            # a worker of --workers N: SO_REUSEPORT, as the sibling worker the port is taken over
            # from may not have closed it yet (rtunnel.fleet.workers); never for a port the system picks
            reuse_port = self.config.reuse_port and port != 0
            return listen_tcp(self.reactor, port, listener, 1024, host, self.gate, ipv6_only, reuse_port)
        except error.CannotListenError as e:
            raise listen_refused(e, host, port) from None

    def _ipv6_only(self, credential: str, host: str) -> bool:
        """Bind `::` IPv6-only for a client that may bind `::` but not
        0.0.0.0: on a dual-stack socket IPv4 visitors would reach it too."""
        policy = self.policy_for(credential)
        if policy is None or policy.permits_address(IPV4_ANY):
            return False
        try:
            return ipaddress.ip_address(host) == ipaddress.IPv6Address("::")
        except ValueError:
            return False

    # ------------------------------------------------------------ letting go

    def _hand_over(self, listener: PublicListener, claim: Claim[ServerSession]) -> None:
        """Make `listener` serve `claim`. Visitors that came while the
        previous owner was detached go with the port."""
        listener.claim = claim
        for visitor in list(listener.away):
            visitor.move_to_owner()
        if claim.holder.attached:
            listener.away.clear()

    def let_go(self, listener: PublicListener) -> None:
        """Its owner no longer wants `listener` (its session ended, or it sent
        UNBIND): the registry hands the port to the newest session of the
        credential that waits for it, with the visitors that waited for the
        owner; it is closed if none does."""
        claim = listener.claim
        if claim is None or listener.port is None:
            self.release(listener)
            return
        heir_claim = self.claims.release(claim, hand_on=not self.shutting_down)
        if heir_claim is None:
            self.release(listener)
            return
        previous, heir = claim.holder, heir_claim.holder
        self._hand_over(listener, heir_claim)
        host, port = listener.key
        self.log.info(
            "port {port} handed over to session {id}, which waited for it", port=port, id=heir.id[:8],
            event="port_handed_over", host=host, credential=heir.credential, session=heir.id[:8],
            previous=previous.id[:8],
        )
        heir.took_port(listener, heir_claim.tag, port)

    def release(self, listener: PublicListener) -> defer.Deferred[None]:
        """Close a public port (once) and give up its claim, to nobody."""
        claim, listener.claim = listener.claim, None
        if claim is not None:
            self.claims.release(claim, hand_on=False)
        listener.away.clear()
        listener.refusals.stop()
        port, listener.port = listener.port, None
        if port is None:
            return defer.succeed(None)
        key = (listener.host, port_number(port))
        self.listeners.pop(key, None)
        self._closing.setdefault(key, [])

        def closed(result: _T) -> _T:
            for waiter in self._closing.pop(key, []):
                waiter.callback(None)
            return result

        stopping = port.stopListening()
        stopped: defer.Deferred[None] = stopping if stopping is not None else defer.succeed(None)
        return stopped.addBoth(closed)

    def when_port_closed(self, port: int) -> defer.Deferred[None] | None:
        """Fires once the released public ports on `port` (any address) have
        closed their sockets; None if none is closing."""
        keys = [key for key in self._closing if key[1] == port]
        if not keys:
            return None
        waiters = []
        for key in keys:
            waiter: defer.Deferred[None] = defer.Deferred()
            self._closing[key].append(waiter)
            waiters.append(waiter)
        return defer.gatherResults(waiters).addCallback(lambda _: None)

    def close_all(self) -> list[defer.Deferred[None]]:
        """Shutdown: no more binds; close every port, handing none on."""
        self.shutting_down = True
        return [self.release(listener) for listener in list(self.listeners.values())]
