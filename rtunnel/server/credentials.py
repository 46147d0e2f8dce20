"""Who may connect, and what each credential may do.

Credentials: the server's token ("default"), each `--client NAME=TOKEN`
(these two follow the server-wide --allow-ports, any bind address), and the
clients of the clients file (rtunnel.auth), each with its own policy, limits
and session settings. A reload (SIGHUP) replaces the clients file's
policies; what that means for running sessions the server decides
(TunnelServer.set_clients), from the change this module reports.
"""

from __future__ import annotations

import dataclasses
import hmac
from dataclasses import dataclass
from typing import Any

from rtunnel import auth
from rtunnel.auth import ClientPolicy
from rtunnel.config import ServerConfig
from rtunnel.errors import ConfigError
from rtunnel.limits import ClientLimiter, Limits
from rtunnel.mux import SessionSettings

DEFAULT_CREDENTIAL = "default"


@dataclass(frozen=True)
class ClientsChange:
    """What a new clients file changed, by client name (each list sorted)."""

    added: list[str]
    removed: list[str]
    rekeyed: list[str]  # token or certificate changed: its sessions end
    changed: list[str]  # another field changed: its sessions stay

    def summary(self) -> dict[str, list[str]]:
        """As the reload reports it: rekeyed clients count as changed."""
        return {"added": self.added, "removed": self.removed, "changed": self.changed + self.rekeyed}


class Credentials:
    """Tokens, client policies and the per-credential limiters."""

    def __init__(
        self, reactor: Any, config: ServerConfig, token: str | None,
        clients: dict[str, ClientPolicy] | None = None,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self._digests: dict[str, bytes] = {}
        if token:
            self._digests[DEFAULT_CREDENTIAL] = auth.token_digest(token)
        for name, extra in config.extra_clients:
            self._digests[name] = auth.token_digest(extra)
        self.clients: dict[str, ClientPolicy] = {}
        if clients:
            self.check_clients(clients)
            self.clients = dict(clients)
        self.limiters: dict[str, ClientLimiter] = {}  # per credential (rtunnel.limits), for the metrics

    def authenticate(self, token: str | None, peer_cert_der: bytes | None = None) -> str | None:
        """The credential a TLS client certificate or a token proves.

        A certificate whose SHA-256 is a clients-file client's cert_sha256
        authenticates that client, whatever the token; otherwise (no
        certificate, or one nobody has) the token decides. Both compare in
        constant time against every candidate. A token that cannot be
        encoded (wire.decode_hello refuses those first) proves nothing."""
        by_cert = auth.authenticate_certificate(self.clients, peer_cert_der)
        if by_cert is not None:
            return by_cert.name
        if token is None:
            return None
        try:
            digest = auth.token_digest(token)
        except ValueError:
            return None
        found = None
        for name, expected in self._digests.items():  # no early exit: constant time
            if hmac.compare_digest(digest, expected):
                found = name
        policy = auth.authenticate(self.clients, token)  # also compares against every client
        if policy is not None:
            found = policy.name
        return found

    def policy_for(self, credential: str) -> ClientPolicy | None:
        """The clients-file policy of a credential; None for the server's
        --token and --client credentials (server-wide --allow-ports)."""
        return self.clients.get(credential)

    def settings_for(self, credential: str) -> SessionSettings:
        """Session settings for a new session: a per-client copy whose
        max_streams is the client's own."""
        base = self.config.session
        policy = self.policy_for(credential)
        if policy is None:
            return base
        return dataclasses.replace(base, max_streams=policy.max_streams)

    def limits_for(self, credential: str) -> Limits:
        """The bandwidth and connection limits of a credential: its
        clients-file entry's, else the server's flags (--bandwidth …)."""
        policy = self.policy_for(credential)
        return policy.limits() if policy is not None else self.config.limits

    def limiter_for(self, credential: str) -> ClientLimiter:
        """The credential's live limiter (its token buckets), shared by all
        its sessions, made on first use."""
        limiter = self.limiters.get(credential)
        if limiter is None:
            limiter = ClientLimiter.create(self.reactor, self.limits_for(credential))
            self.limiters[credential] = limiter
        return limiter

    def check_clients(self, clients: dict[str, ClientPolicy]) -> None:
        """Raise ConfigError if a clients-file name is also a --client (or reserved)."""
        clash = sorted(set(clients) & set(self._digests))
        if clash:
            raise ConfigError(
                f"{self.config.clients_file}: client {clash[0]!r} is also given with --client or "
                "is reserved; use another name"
            )

    def set_clients(self, clients: dict[str, ClientPolicy]) -> ClientsChange:
        """Replace the clients-file policies and say what changed. Raises
        ConfigError (changing nothing) if the set clashes."""
        self.check_clients(clients)
        old, self.clients = self.clients, dict(clients)
        kept = set(old) & set(clients)
        rekeyed = sorted(
            n for n in kept
            if (old[n].token_sha256, old[n].cert_sha256) != (clients[n].token_sha256, clients[n].cert_sha256)
        )
        return ClientsChange(
            added=sorted(set(clients) - set(old)),
            removed=sorted(set(old) - set(clients)),
            rekeyed=rekeyed,
            changed=sorted(n for n in kept if old[n] != clients[n] and n not in rekeyed),
        )

    def refresh_limiters(self) -> dict[str, ClientLimiter]:
        """After a reload: new buckets for each credential whose limits
        changed (counts carried over, the old buckets stopped); returns
        them, for its sessions to switch to."""
        renewed = {}
        for credential, old in list(self.limiters.items()):
            limits = self.limits_for(credential)
            if old.limits == limits:
                continue
            old.stop()
            new = ClientLimiter.create(self.reactor, limits)
            new.carry_counts(old)
            self.limiters[credential] = renewed[credential] = new
        return renewed

    def stop(self) -> None:
        for limiter in self.limiters.values():
            limiter.stop()
