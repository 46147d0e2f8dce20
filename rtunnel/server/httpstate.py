"""The state of one visitor connection on the shared ports, as the parts of
`rtunnel.server.httpedge.HttpVisitor` (its routing, `httprouting`; its
responses, `httpresponses`) see it: the attributes HttpVisitor sets and the
steps each part calls in another. Declarations only (no behaviour)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import h11

    from rtunnel.server.hostnames import HostStats, HostTunnel
    from rtunnel.server.httpedge import HttpEdge
    from rtunnel.server.httpmessages import EdgeError
    from rtunnel.server.httpupstream import Upstream


class VisitorState:
    """What HttpVisitor holds (set in its __init__) and does, for its parts."""

    if TYPE_CHECKING:
        edge: HttpEdge
        transport: Any
        scheme: str
        server_name: str
        buffer: bytes
        inbox: bytes
        eof: bool
        closed: bool
        conn: h11.Connection | None
        upstream: Upstream | None
        tunnel: HostTunnel | None
        stats: HostStats | None
        relaying: bool
        trusted: bool
        keep_alive: bool
        framing: str
        out: list[bytes] | None
        waiting: Any
        request: h11.Request | None
        headers: list[tuple[bytes, bytes]]
        fields: dict[bytes, bytes]
        stats_name: str
        names: tuple[bytes, str | None]
        host_name: str
        forwarding: tuple[bytes, bytes]
        response_started: bool
        status: int
        sent: int
        started: float
        peer: tuple[str, int]
        local: tuple[str, int]

        def _pause(self, why: str) -> None: ...
        def _resume(self, why: str) -> None: ...
        def _pump(self) -> None: ...
        def _rest(self, conn: h11.Connection) -> tuple[bytes, bool]: ...
        def _count_in(self, n: int) -> None: ...
        def _arm_head_timer(self) -> None: ...
        def _next_request(self) -> None: ...
        def _fail(self, error: EdgeError) -> None: ...
        def _close(self, abort: bool = False) -> None: ...
        def _answer(self, status: int, body: bytes, content_type: bytes = ..., location: bytes | None = ...) -> None: ...
        def _to_upstream(self, data: bytes) -> None: ...
        def _to_visitor(self, data: bytes) -> None: ...
        def _account(self, status: int) -> None: ...
        def is_head_request(self) -> bool: ...
