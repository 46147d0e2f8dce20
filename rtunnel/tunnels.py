"""The client's tunnels: what it asks the server to bind, what the server
bound, and the local ends of what arrives on them.

`ClientTunnels` is owned by `rtunnel.client.TunnelClient`, which tells it
when a session starts (`session_started`, `bind_all`) and ends
(`session_ended`) and hands it the session's frames about tunnels (BOUND,
BIND_FAILED), its OPENs and its datagrams. It answers with BIND and UNBIND
on the current session, retries a refused BIND every BIND_RETRY_DELAY
seconds, connects each OPEN to its target and each datagram to its flow's
socket (`rtunnel.udpflows`). Read as a mapping it is the tunnels by id;
they change only through `add`, `remove` and `retarget` (a config reload).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from rtunnel import proxyproto, wire
from rtunnel.addresses import bracket, format_peer, public_address
from rtunnel.config import ClientConfig, TunnelSpec
from rtunnel.counters import tunnel_name
from rtunnel.mux import ProtocolViolation, Session, Stream
from rtunnel.targets import TargetFactory, reset_code_for
from rtunnel.udpflows import UdpFlows
from rtunnel.wire import FrameType, ResetCode

#: BIND_FAILED codes that retrying cannot fix (docs/protocol.md): fatal for
#: a tunnel of the start, the end of just that tunnel for one added live
FATAL_BIND_CODES = {"not_permitted", "bad_address", "limit", "unsupported"}
BIND_RETRY_DELAY = 5.0


class ClientTunnels(Mapping[int, TunnelSpec]):
    """The client's tunnels by id, their public names and their local ends.

    It speaks only on the session `current()` returns (the client's, or
    None between sessions), logs as the client (`log`) and reports a
    refusal that ends the client to `fatal`. Tunnel ids are never reused."""

    def __init__(
        self,
        reactor: Any,
        config: ClientConfig,
        log: Logger,
        current: Callable[[], Session | None],
        fatal: Callable[[str], None],
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.log = log
        self._current = current
        self._fatal = fatal
        self._specs: dict[int, TunnelSpec] = {t.tunnel_id: t for t in config.tunnels}
        self.bound: dict[int, tuple[str, int]] = {}
        # tunnel id -> "host:port" from its BOUND, never popped (ids are never
        # reused): a removed tunnel's connections keep their metrics label
        self.names: dict[int, str] = {}
        self.bound_waiters: list[defer.Deferred[dict[int, tuple[str, int]]]] = []
        self._connecting: dict[int, TargetFactory] = {}
        self._bind_retries: list[IDelayedCall] = []
        # live tunnel changes (add, remove): ids are never reused
        self._next_tunnel_id = max(self._specs, default=0) + 1
        self._unbound: set[int] = set()  # removed ids whose BOUND/BIND_FAILED may still come
        self._added_live: set[int] = set()  # added while running: a refusal drops only that tunnel
        self._taken_over: set[int] = set()  # tunnels told (once, at warn) that a newer client holds the port
        # UDP tunnels' flows (rtunnel.udpflows): one local socket per flow, kept across resumes
        self.udp = UdpFlows(reactor, config.udp_idle_timeout, config.udp_max_flows, self._send_datagram)

    # ------------------------------------------------------------ the mapping

    def __getitem__(self, tunnel_id: int) -> TunnelSpec:
        return self._specs[tunnel_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    # ------------------------------------------------------------ the session's life

    def session_started(self) -> None:
        """A new session: nothing is bound on it yet (its BINDs follow, `bind_all`)."""
        self.bound.clear()
        self._unbound.clear()
        self._taken_over.clear()

    def bind_all(self) -> None:
        for spec in self._specs.values():
            self._send_bind(spec)

    def session_ended(self) -> None:
        """The session is gone (abandoned, or moved away from): no BIND is
        retried on it, and its UDP flows (numbered by its server) close."""
        for call in self._bind_retries:
            if call.active():
                call.cancel()
        self._bind_retries.clear()
        self.udp.clear()

    def when_bound(self) -> defer.Deferred[dict[int, tuple[str, int]]]:
        """Fires with {tunnel id: (host, port)} once every tunnel is bound."""
        d: defer.Deferred[dict[int, tuple[str, int]]] = defer.Deferred()
        self.bound_waiters.append(d)
        self._check_all_bound()
        return d

    def name(self, tunnel_id: int) -> str:
        """A tunnel's public "host:port" as the server bound it (the
        server's label for it too), or as asked for until it is bound."""
        name = self.names.get(tunnel_id)
        if name is not None:
            return name
        spec = self._specs.get(tunnel_id)
        return tunnel_name(spec.bind_host or "*", spec.bind_port) if spec is not None else "?"

    # ------------------------------------------------------------ the server's answers

    def bound_received(self, answer: wire.Bound) -> None:
        if answer.tunnel in self._unbound:
            return  # bound before our UNBIND reached the server, which closes it
        spec = self._specs.get(answer.tunnel)
        if spec is None:
            raise ProtocolViolation("BOUND for a tunnel this client did not ask for")
        if answer.kind in ("http", "tls"):
            self._bound_hostname(spec, answer)
            return
        host = answer.host if answer.host is not None else spec.bind_host
        self.bound[spec.tunnel_id] = (host, answer.port)
        self._taken_over.discard(spec.tunnel_id)
        prefix = "udp:" if spec.kind == "udp" else ""
        self.names[spec.tunnel_id] = prefix + tunnel_name(host, answer.port)
        self.log.info(
            "tunnel ready: {address} -> {target}",
            address=prefix + public_address(host, answer.port, self.config.server_host),
            target=prefix + spec.target, kind=spec.kind,
            server=bracket(self.config.server_host), port=answer.port,
            event="tunnel_ready", tunnel=spec.tunnel_id, host=host,
        )
        self._check_all_bound()

    def _bound_hostname(self, spec: TunnelSpec, answer: wire.Bound) -> None:
        """A hostname is ours: log the public URLs the server gave."""
        self.bound[spec.tunnel_id] = (answer.hostname, 0)
        self._taken_over.discard(spec.tunnel_id)
        self.names[spec.tunnel_id] = answer.hostname
        self.log.info(
            "tunnel ready: {public} -> {target}", public=" ".join(answer.urls) or answer.hostname, target=spec.target,
            event="tunnel_ready", tunnel=spec.tunnel_id, kind=answer.kind, hostname=answer.hostname,
            urls=list(answer.urls),
        )
        self._check_all_bound()

    def bind_failed(self, session: Session, answer: wire.BindFailed) -> None:
        spec = self._specs.get(answer.tunnel)
        message, code = answer.message or "no reason given", answer.code
        if spec is None and answer.tunnel in self._unbound:
            return  # refused, and removed since: nothing to do
        if spec is None:
            raise ProtocolViolation("BIND_FAILED for a tunnel this client did not ask for")
        if code == "taken_over":  # a newer client of our credential holds the port: wait for it
            public = self.bound.pop(spec.tunnel_id, (spec.bind_host, spec.bind_port))
            level = self.log.debug if spec.tunnel_id in self._taken_over else self.log.warn
            self._taken_over.add(spec.tunnel_id)
            level(
                "{what} is not ours now: {message}; asking again every {delay:.0f} s",
                what=f"hostname {spec.hostname}" if spec.kind != "tcp" else f"port {public[1]}",
                port=public[1], message=message, delay=BIND_RETRY_DELAY, event="bind_taken_over",
                tunnel=spec.tunnel_id, host=public[0], code=code, reason=message,
            )
            self._retry_bind_later(session, spec)
            return
        if code == "closed":  # the server's administrator closed a bound port
            public = self.bound.pop(spec.tunnel_id, (spec.bind_host, spec.bind_port))
            self.log.warn(
                "the server closed {what}: {message}; it opens again when this "
                "client starts a new session (restart it to reopen it now)",
                what=f"hostname {spec.hostname}" if spec.kind != "tcp" else f"port {public[1]}", port=public[1], message=message, event="tunnel_closed", tunnel=spec.tunnel_id, host=public[0], reason=message,
            )
            return
        text = (
            f"the server refused to open port {spec.bind_port}: {message}" if spec.kind == "tcp"
            else f"the server refused hostname {spec.hostname} ({spec.kind}): {message}"
        )
        if code in FATAL_BIND_CODES and spec.tunnel_id in self._added_live:
            # a tunnel added while running: drop it, keep the others up
            self.log.error("{text}; tunnel not added", text=text, event="tunnel_add_failed", tunnel=spec.tunnel_id, host=spec.bind_host, port=spec.bind_port, code=code, reason=message)
            self._specs.pop(spec.tunnel_id, None)
            self._added_live.discard(spec.tunnel_id)
            self._check_all_bound()
        elif code in FATAL_BIND_CODES:
            self._fatal(text)
        else:
            self.log.error("{text} (retrying in {delay:.0f} s)", text=text, delay=BIND_RETRY_DELAY, event="bind_failed", tunnel=spec.tunnel_id, host=spec.bind_host, port=spec.bind_port, code=code, reason=message)
            self._retry_bind_later(session, spec)

    def _retry_bind_later(self, session: Session, spec: TunnelSpec) -> None:
        self._bind_retries = [c for c in self._bind_retries if c.active()]
        self._bind_retries.append(self.reactor.callLater(BIND_RETRY_DELAY, self._retry_bind, session, spec))

    def _retry_bind(self, session: Session, spec: TunnelSpec) -> None:
        if session is self._current() and spec.tunnel_id in self._specs and spec.tunnel_id not in self.bound:
            self._send_bind(self._specs[spec.tunnel_id])

    def _check_all_bound(self) -> None:
        if self._specs and len(self.bound) == len(self._specs):
            waiters, self.bound_waiters = self.bound_waiters, []
            for d in waiters:
                d.callback(dict(self.bound))

    def _send_bind(self, spec: TunnelSpec) -> None:
        session = self._current()
        if session is None:
            return
        bind = wire.Bind(spec.tunnel_id, spec.bind_host, spec.bind_port, spec.kind, spec.hostname)
        session.send_json(FrameType.BIND, bind.to_json())

    # ------------------------------------------------------------ live tunnel changes

    def add(self, spec: TunnelSpec) -> TunnelSpec:
        """Add a tunnel to the running client under a fresh id (returned).

        With a session it is bound at once (BIND is reliable: sent while the
        link is down, it reaches the server on resume); without one, the
        next session binds it with the others."""
        spec = replace(spec, tunnel_id=self._next_tunnel_id)
        self._next_tunnel_id += 1
        self._specs[spec.tunnel_id] = spec
        self._added_live.add(spec.tunnel_id)
        self._send_bind(spec)
        return spec

    def remove(self, tunnel_id: int) -> TunnelSpec:
        """Close a tunnel's port on the server (UNBIND). Its open connections
        carry on until they close; visitors arriving after it are refused."""
        spec = self._specs.pop(tunnel_id)
        self.bound.pop(tunnel_id, None)
        self.udp.drop_tunnel(tunnel_id)
        self._added_live.discard(tunnel_id)
        session = self._current()
        if session is not None:
            self._unbound.add(tunnel_id)
            session.send_json(FrameType.UNBIND, {"tunnel": tunnel_id})
        self._check_all_bound()
        return spec

    def retarget(self, spec: TunnelSpec) -> None:
        """Give a live tunnel a new target (or PROXY setting) under the same
        id and port: new visitors reach the new target, open ones stay."""
        if spec.tunnel_id not in self._specs:
            raise KeyError(spec.tunnel_id)
        self._specs[spec.tunnel_id] = spec

    # ------------------------------------------------------------ local ends

    def open_target(self, stream: Stream, tunnel_id: int, info: dict[str, Any]) -> None:
        """The server opened `stream` on a tunnel: connect it to the tunnel's
        target (a failure resets the stream, with the reason logged)."""
        spec = self._specs.get(tunnel_id)
        if spec is None:
            stream.reset(ResetCode.REFUSED, f"no tunnel {tunnel_id} on this client")
            return
        header = proxyproto.header(spec.proxy_protocol, info.get("src"), info.get("dst"))

        def settled(failure: Failure | None) -> None:
            self._connecting.pop(stream.id, None)
            if failure is None or stream.closed:
                return  # connected, or cancelled: the stream is gone
            code, why = reset_code_for(failure)
            self.log.warn(
                "target {target} failed for a visitor from {visitor}: {why}",
                target=spec.target, visitor=format_peer(info.get("src")), why=why,
                host=spec.target_host, port=spec.target_port, src=info.get("src"),
                event="target_failed", tunnel=tunnel_id, stream=stream.id, reason=why,
            )
            stream.local_failed(code, f"target {spec.target}: {why}")

        factory = self._connecting[stream.id] = TargetFactory(stream, header, settled)
        factory.connect(self.reactor, spec, self.config.connect_timeout)

    def stream_closed(self, stream: Stream) -> None:
        """A stream is gone: a connection still being made for it stops."""
        connecting = self._connecting.pop(stream.id, None)
        if connecting is not None:
            connecting.cancel()

    def datagram_received(self, session: Session, datagram: wire.Datagram) -> None:
        spec = self._specs.get(datagram.tunnel)
        if session is not self._current() or spec is None or spec.kind != "udp":
            self.udp.counters(datagram.tunnel).drops["unknown_tunnel"] += 1  # removed meanwhile
            return
        self.udp.deliver(spec, self.bound.get(spec.tunnel_id), datagram)

    def _send_datagram(self, tunnel_id: int, flow_id: int, payload: bytes) -> str | None:
        """A target's datagram to the server, now or never (rtunnel.udpflows)."""
        session = self._current()
        if session is None:
            return "link_down"
        return session.send_datagram(tunnel_id, flow_id, payload)
