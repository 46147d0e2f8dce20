"""The fleet's etcd keys (all under --fleet-prefix, default /rtunnel/):

    members/<member>                 {"link", "control", "pid", "started"}       under the member's lease
    claims/tcp/<host>/<port>         {"credential", "member", "session",         under the holding
    claims/udp/<host>/<port>          "tunnel", "serial"}                         member's lease
    claims/host/<hostname>            (a hostname's also "kind": "http" or "tls")
    sessions/<session id>            {"member", "credential"}                    under the home member's lease

`<host>` is the address a client asked for, or `default` for a BIND
without one: each member binds such a port on its own --public-host, and
"port 4000" is one claim fleet-wide.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from rtunnel.server.claims import Hostname, Name, TcpPort, UdpPort

DEFAULT_PREFIX = "/rtunnel/"
DEFAULT_HOST = "default"


def claim_key(name: Name, default_hosts: frozenset[str]) -> str:
    """The key of `name` below the prefix; a port on one of this member's
    default addresses is the fleet-wide `default` one."""
    if isinstance(name, Hostname):
        return f"claims/host/{name.name}"
    kind = "tcp" if isinstance(name, TcpPort) else "udp"
    host = DEFAULT_HOST if name.host in default_hosts else name.host
    return f"claims/{kind}/{host}/{name.port}"


def claim_name(key: str, public_host: str) -> Name | None:
    """The Name a claim key stands for on this member (`default`: on its
    --public-host); None if `key` is not a claim key."""
    parts = key.split("/")
    if len(parts) == 3 and parts[:2] == ["claims", "host"]:
        return Hostname(parts[2])
    if len(parts) != 4 or parts[0] != "claims" or parts[1] not in ("tcp", "udp") or not parts[3].isdigit():
        return None
    host = public_host if parts[2] == DEFAULT_HOST else parts[2]
    return TcpPort(host, int(parts[3])) if parts[1] == "tcp" else UdpPort(host, int(parts[3]))


@dataclass(frozen=True, slots=True)
class ClaimRecord:
    """A claim's value in etcd."""

    credential: str
    member: str
    session: str
    tunnel: int
    serial: int
    #: a hostname's tunnel kind, "http" or "tls" (how an edge serves it); "" for ports, and
    #: for a record written by an older member (an edge then takes it as "http")
    kind: str = ""

    def encode(self) -> bytes:
        value: dict[str, Any] = {
            "credential": self.credential, "member": self.member, "session": self.session,
            "tunnel": self.tunnel, "serial": self.serial,
        }
        if self.kind:
            value["kind"] = self.kind
        return json.dumps(value, sort_keys=True).encode()

    @classmethod
    def decode(cls, value: bytes) -> ClaimRecord | None:
        try:
            data: Any = json.loads(value)
            return cls(str(data["credential"]), str(data["member"]), str(data["session"]),
                       int(data["tunnel"]), int(data["serial"]), str(data.get("kind", ""))[:8])
        except (ValueError, KeyError, TypeError):
            return None
