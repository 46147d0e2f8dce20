"""Hostnames on the shared HTTP/HTTPS ports: who may claim which name, the
claims (through the same registry as ports, rtunnel.server.claims), and the
route from a request's Host or a ClientHello's SNI to the tunnel serving it.

A name is normalised once (`normalise`: lower case, IDNA A-labels, no
trailing dot) before any comparison. One claim of a name covers HTTP, HTTPS
and TLS passthrough; the tunnel's kind ("http" or "tls") says how the
HTTPS port serves it.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from rtunnel.auth import ClientPolicy
from rtunnel.httpconfig import BadHostname, HttpSettings, normalise
from rtunnel.mux import SessionBufferFull, Stream, StreamIdsExhausted
from rtunnel.server.claims import Claim, ClaimRefused, ClaimRegistry, Hostname

if TYPE_CHECKING:
    from rtunnel.server.certificates import CertificateSource
    from rtunnel.server.session import ServerSession

@dataclass
class HostStats:
    """Counters of one hostname, for metrics, the admin page and logs."""

    requests: int = 0
    bytes_in: int = 0  # request bodies and heads from visitors
    bytes_out: int = 0  # responses to visitors
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)  # "2xx" -> n
    tls_passthrough: int = 0  # connections relayed by SNI


class HostTunnel:
    """A claimed hostname served as one tunnel of its holder's session."""

    log = Logger()

    def __init__(self, kind: str, claim: Claim[ServerSession]) -> None:
        self.kind = kind  # "http" or "tls"
        self.claim: Claim[ServerSession] | None = claim

    @property
    def name(self) -> str:
        assert self.claim is not None
        assert isinstance(self.claim.name, Hostname)
        return self.claim.name.name

    @property
    def owner(self) -> ServerSession | None:
        return self.claim.holder if self.claim is not None else None

    @property
    def tunnel_id(self) -> int:
        return self.claim.tag if self.claim is not None else 0

    def room(self) -> str | None:
        """None if the owner can take one more stream now, else why not."""
        owner = self.owner
        if owner is None or owner.expired:
            return "the tunnel is closed"
        mux = owner.mux_session
        if len(mux.streams) >= mux.settings.max_streams:
            return "the tunnel has its most open connections"
        if not mux.room_for_stream():
            return "the tunnel's session buffer is full"
        return None

    def open_stream(self, src: list[Any], dst: list[Any]) -> Stream | None:
        """OPEN a stream to the client for one visitor (or one run of its
        requests to this name); None if the session refuses it."""
        owner = self.owner
        if owner is None or owner.expired:
            return None
        try:
            return owner.mux_session.open_stream(self.tunnel_id, {"src": src, "dst": dst})
        except SessionBufferFull:
            return None
        except StreamIdsExhausted as e:
            owner.expire(str(e))
            return None


class HostRefused(Exception):
    """A hostname BIND the server refuses: BIND_FAILED `code` and `message`."""

    def __init__(self, code: str, message: str, repeated: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.repeated = repeated


class HostRoutes:
    """Every claimed hostname's tunnel, and the route from a name to it."""

    log = Logger()

    def __init__(self, settings: HttpSettings, claims: ClaimRegistry[ServerSession]) -> None:
        self.settings = settings
        self.claims = claims
        self.domain = normalise(settings.domain) if settings.domain else None
        self.tunnels: dict[str, HostTunnel] = {}  # normalised name -> its tunnel
        self.stats: dict[str, HostStats] = collections.defaultdict(HostStats)  # claimed names only
        self.edge_answers: collections.Counter[int] = collections.Counter()  # status -> answers the edge gave
        self.certificates: CertificateSource | None = None  # told of claims (ACME asks for names)
        self.http_port = 0  # the shared ports as bound, for the URLs in BOUND
        self.https_port = 0

    # ------------------------------------------------------------ policy

    def full_name(self, requested: str) -> str:
        """The normalised name a BIND's `hostname` asks for: a single label
        is completed with --domain (without one it is a name of its own,
        e.g. "localhost", which only a clients-file `hosts` entry permits)."""
        try:
            if "." not in requested.strip().rstrip(".") and self.domain is not None:
                return normalise(f"{requested.strip()}.{self.domain}")
            return normalise(requested, wildcard=True)
        except BadHostname as e:
            raise HostRefused("bad_address", f"{e}; use a DNS name such as myapp or app.example.com") from None

    def check_permitted(self, policy: ClientPolicy | None, credential: str, name: str) -> None:
        """Raise HostRefused unless the credential may claim `name`: a
        clients-file client the names of its `hosts` (a "*.zone" entry also
        covers one label under zone); a token credential NAME.DOMAIN."""
        if policy is not None:
            for allowed in getattr(policy, "hosts", ()):
                if name == allowed or (
                    allowed.startswith("*.") and name.count(".") == allowed.count(".")
                    and name.endswith(allowed[1:])
                ):
                    return
            hosts = ", ".join(getattr(policy, "hosts", ())) or "none"
            raise HostRefused(
                "not_permitted",
                f"hostname {name} is not permitted for client {policy.name} (its hosts: {hosts}); "
                "add it to hosts in the clients file",
            )
        if self.domain is not None and name.endswith("." + self.domain) and "." not in name[: -len(self.domain) - 1]:
            if not name.startswith("*."):
                return
        where = f"NAME.{self.domain}" if self.domain else "none (the server has no --domain)"
        raise HostRefused(
            "not_permitted",
            f"hostname {name} is not permitted for token credential {credential} (it may take: {where}); "
            "ask for a name under the server's domain, or use a clients-file client with hosts",
        )

    @staticmethod
    def check_tunnel_count(owner: ServerSession, policy: ClientPolicy | None) -> None:
        """Raise HostRefused `limit` if `owner` holds its most tunnels (ports
        and hostnames count alike: --max-tunnels, or the client's max_tunnels)."""
        if policy is None:
            limit = owner.server.config.max_tunnels
            if owner.tunnel_count >= limit:
                raise HostRefused("limit", f"at most {limit} tunnels per session (--max-tunnels); close one first")
        elif owner.tunnel_count >= policy.max_tunnels:
            raise HostRefused(
                "limit",
                f"client {policy.name} may have at most {policy.max_tunnels} tunnels per session; close one first",
            )

    def not_permitted(self, session: ServerSession, policy: ClientPolicy) -> list[str]:
        """The hostnames `session` holds that `policy` (reloaded) no longer permits."""
        outside = []
        for tunnel in session.hostnames.values():
            if tunnel.claim is None:
                continue
            try:
                self.check_permitted(policy, session.credential, tunnel.name)
            except HostRefused:
                outside.append(tunnel.name)
        return outside

    # ------------------------------------------------------------ claims

    def bind(self, owner: ServerSession, tunnel_id: int, kind: str, requested: str) -> HostTunnel:
        """Claim `requested` for `owner`'s tunnel, or raise HostRefused."""
        name = self.full_name(requested)
        policy = owner.server.policy_for(owner.credential)
        self.check_permitted(policy, owner.credential, name)
        self.check_tunnel_count(owner, policy)
        try:
            claimed = self.claims.claim(Hostname(name), owner, tunnel_id)
        except ClaimRefused as refusal:
            if refusal.code == ClaimRefused.TAKEN_OVER:
                raise HostRefused(
                    "taken_over",
                    f"hostname {name} is held by a newer session of client {owner.credential} (another "
                    "client with the same credential); this client gets it when that session lets go of it",
                    refusal.repeated,
                ) from None
            raise HostRefused("in_use", f"hostname {name} is held by another client; choose another name") from None
        tunnel = HostTunnel(kind, claimed.claim)
        previous = claimed.previous
        if previous is not None and previous.holder is not owner:
            old = previous.holder.hostnames.pop(previous.tag, None)
            if old is not None:
                old.claim = None
                previous.holder.lost_hostname(name, previous.tag)
            if not previous.holder.tunnels and not previous.holder.hostnames and not previous.holder.attached:
                previous.holder.expire("its owner started a new session")
        self.tunnels[name] = tunnel
        if previous is None and self.certificates is not None and kind == "http":  # passthrough: its own TLS
            self.certificates.name_claimed(name)
        return tunnel

    def let_go(self, tunnel: HostTunnel, shutting_down: bool = False) -> None:
        """Its owner no longer wants `tunnel`: the newest waiting session of
        the credential gets the name, or the name is free."""
        claim, tunnel.claim = tunnel.claim, None
        if claim is None:
            return
        name = tunnel_name = claim.name.name if isinstance(claim.name, Hostname) else ""
        heir_claim = self.claims.release(claim, hand_on=not shutting_down)
        if self.tunnels.get(name) is tunnel:
            del self.tunnels[name]
        if heir_claim is None:
            if self.certificates is not None and tunnel.kind == "http":
                self.certificates.name_released(tunnel_name)
            return
        heir = heir_claim.holder
        new = HostTunnel(tunnel.kind, heir_claim)
        self.tunnels[name] = new
        self.log.info(
            "hostname {name} handed over to session {id}, which waited for it", name=name, id=heir.id[:8],
            event="hostname_handed_over", hostname=name, credential=heir.credential, session=heir.id[:8],
        )
        heir.took_hostname(new, heir_claim.tag)

    def close_all(self) -> None:
        for tunnel in list(self.tunnels.values()):
            self.let_go(tunnel, shutting_down=True)

    # ------------------------------------------------------------ routing

    def route(self, name: str | None) -> HostTunnel | None:
        """The tunnel serving normalised `name`: its own claim, else the
        wildcard one level up ("*.zone" serves "x.zone")."""
        if not name:
            return None
        tunnel = self.tunnels.get(name)
        if tunnel is None and "." in name:
            tunnel = self.tunnels.get("*." + name.split(".", 1)[1])
        return tunnel

    def urls(self, name: str, kind: str) -> tuple[str, ...]:
        """The public addresses of a claimed name, for BOUND."""
        shown = name.replace("*.", "WILDCARD.", 1) if name.startswith("*.") else name
        urls = []
        if self.https_port:
            suffix = "" if self.https_port == 443 else f":{self.https_port}"
            urls.append(f"https://{shown}{suffix}")
        if self.http_port and kind == "http":
            suffix = "" if self.http_port == 80 else f":{self.http_port}"
            urls.append(f"http://{shown}{suffix}")
        return tuple(urls)
