"""Per-client credentials and port policy, from a TOML clients file.

    [clients.alice]
    token_sha256 = "…"          # hex SHA-256 of the token (never the token)
    cert_sha256 = "…"           # and/or: hex SHA-256 of its TLS client certificate (DER)
    ports = ["4000-4099", 5432]
    bind = ["0.0.0.0"]          # default: the server's --bind-default
    max_tunnels = 16
    max_streams = 1024
    bandwidth = 1000000         # optional, bytes/s each way; per direction (overrides it):
    bandwidth_from_client = 250000  # the client's service -> visitors (and bandwidth_to_client)
    max_connections_per_tunnel = 100  # optional: visitors at once per tunnel

`load_clients` validates the whole file or raises ConfigError naming the
file, the client, the key and what is wrong. `add_client` makes a token,
writes only its hash (atomically, mode 0600) and returns the token.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import ipaddress
import re
import secrets
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from rtunnel.errors import ConfigError, StateDirError
from rtunnel.files import replace_private
from rtunnel.httpconfig import BadHostname, normalise
from rtunnel.limits import Limits

DEFAULT_BIND: tuple[str, ...] = ("0.0.0.0", "::")
DEFAULT_MAX_TUNNELS = 16
DEFAULT_MAX_STREAMS = 4096
RESERVED_NAMES = frozenset({"default"})
LIMIT_KEYS = ("bandwidth", "bandwidth_to_client", "bandwidth_from_client", "max_connections_per_tunnel")
KEYS = ("token_sha256", "cert_sha256", "ports", "hosts", "bind", "max_tunnels", "max_streams", *LIMIT_KEYS)
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class ClientPolicy:
    """One client of the clients file: its token's hash and what it may do."""

    name: str
    token_sha256: str | None  # 64 lower-case hex digits (None: certificate only)
    ports: tuple[tuple[int, int], ...]
    bind: tuple[str, ...] = DEFAULT_BIND
    max_tunnels: int = DEFAULT_MAX_TUNNELS
    max_streams: int = DEFAULT_MAX_STREAMS
    cert_sha256: str | None = None  # SHA-256 of the client certificate's DER, lower-case hex
    # per-client limits (rtunnel.limits), None: unlimited
    bandwidth_to_client: int | None = None  # bytes/s visitors -> the client's service
    bandwidth_from_client: int | None = None  # bytes/s the client's service -> visitors
    max_connections_per_tunnel: int | None = None
    hosts: tuple[str, ...] = ()  # hostnames it may claim, normalised ("*.zone": the wildcard and one label under it)

    def limits(self) -> Limits:
        return Limits(self.bandwidth_to_client, self.bandwidth_from_client, self.max_connections_per_tunnel)

    def permits_port(self, port: int) -> bool:
        return any(lo <= port <= hi for lo, hi in self.ports)

    def permits_address(self, host: str) -> bool:
        try:
            wanted = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ipaddress.ip_address(b) == wanted for b in self.bind)

    def describe_ports(self) -> str:
        return format_ranges(self.ports)


def format_ranges(ranges: Iterable[tuple[int, int]]) -> str:
    return ",".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in ranges)


def token_digest(token: str) -> bytes:
    """SHA-256 of a token's UTF-8. A token read from the command line keeps
    its non-UTF-8 bytes as surrogate escapes, which encode back to those
    bytes; any other lone surrogate raises UnicodeEncodeError (a ValueError)."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def authenticate(clients: Mapping[str, ClientPolicy], token: object) -> ClientPolicy | None:
    """The client whose token hash matches, compared in constant time against
    every client (no early exit, so timing does not tell which one matched).
    A token that is no string, or no text (a lone surrogate), matches none."""
    if not isinstance(token, str):
        return None
    try:
        digest = token_digest(token)
    except ValueError:
        return None
    found = None
    for policy in clients.values():
        if policy.token_sha256 is None:
            hmac.compare_digest(digest, _NO_MATCH)  # same work for every client
            continue
        if hmac.compare_digest(digest, bytes.fromhex(policy.token_sha256)):
            found = policy
    return found


_NO_MATCH = b"\x00" * 32


def cert_digest(cert_der: bytes) -> str:
    """The cert_sha256 of a certificate: hex SHA-256 of its DER encoding."""
    return hashlib.sha256(cert_der).hexdigest()


def authenticate_certificate(clients: Mapping[str, ClientPolicy], cert_der: bytes | None) -> ClientPolicy | None:
    """The client whose cert_sha256 matches the TLS client certificate
    `cert_der` (None: no certificate), compared against every client."""
    if not cert_der:
        return None
    digest = hashlib.sha256(cert_der).digest()
    found = None
    for policy in clients.values():
        if policy.cert_sha256 is None:
            continue
        if hmac.compare_digest(digest, bytes.fromhex(policy.cert_sha256)):
            found = policy
    return found


# ---------------------------------------------------------------- loading


def parse_port_range(item: object, where: str) -> tuple[int, int]:
    """`4000`, `"4000"` or `"4000-4099"` -> (lo, hi)."""
    if isinstance(item, int) and not isinstance(item, bool):
        lo = hi = item
    elif isinstance(item, str):
        low, sep, high = item.strip().partition("-")
        try:
            lo = int(low)
            hi = int(high) if sep else lo
        except ValueError:
            raise ConfigError(
                f"{where}: {item!r} is not a port or a range like \"4000-4099\""
            ) from None
    else:
        raise ConfigError(
            f"{where}: {item!r} is a {_type(item)}; write a port (5432) or a range (\"4000-4099\")"
        )
    for p in (lo, hi):
        if not 1 <= p <= 65535:
            raise ConfigError(f"{where}: port {p} in {item!r} is outside 1-65535")
    if hi < lo:
        raise ConfigError(f"{where}: range {item!r} is backwards (write low-high)")
    return lo, hi


def _type(value: object) -> str:
    return {
        bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
        dict: "table",
    }.get(type(value), type(value).__name__)


def _validate_client(
    path: Path, name: str, table: object, default_bind: tuple[str, ...],
    default_max_tunnels: int, default_max_streams: int,
) -> ClientPolicy:
    if not _NAME.match(name):
        raise ConfigError(
            f"{path}: client name {name!r} must be 1-64 letters, digits, '_' or '-'"
        )
    if name in RESERVED_NAMES:
        raise ConfigError(f"{path}: client name {name!r} is reserved for the server's --token; choose another")
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: clients.{name} is a {_type(table)}; it must be a table [clients.{name}]")

    def where(key: str) -> str:
        return f"{path}: client {name!r}, key {key!r}"

    for key in table:
        if key not in KEYS:
            raise ConfigError(f"{where(key)}: unknown key (known keys: {', '.join(KEYS)})")
    digests: dict[str, str | None] = {}
    for key, how in (
        ("token_sha256", "printf %s TOKEN | sha256sum"),
        ("cert_sha256", "openssl x509 -in client.crt -outform DER | sha256sum"),
    ):
        value = table.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise ConfigError(f"{where(key)}: is a {_type(value)}; it must be a string of 64 hex digits")
            if not _HEX64.match(value):
                raise ConfigError(
                    f"{where(key)}: {value[:80]!r} is not 64 hex digits (a SHA-256 digest, e.g. from: {how})"
                )
            value = value.lower()
        digests[key] = value
    if digests["token_sha256"] is None and digests["cert_sha256"] is None:
        raise ConfigError(
            f"{where('token_sha256')}: missing; every client needs the hex SHA-256 of its token "
            "(rtunnel_server add-client makes one) or cert_sha256, the hex SHA-256 of its TLS "
            "client certificate (openssl x509 -in client.crt -outform DER | sha256sum)"
        )
    hosts = _hosts(table.get("hosts"), where("hosts"))
    ports_value = table.get("ports")
    if ports_value is None and hosts:
        ports_value = []  # a client of hostnames only
    elif ports_value is None:
        raise ConfigError(f"{where('ports')}: missing; list the ports this client may open, e.g. [\"4000-4099\"]")
    if not isinstance(ports_value, list):
        raise ConfigError(f"{where('ports')}: is a {_type(ports_value)}; it must be a list, e.g. [\"4000-4099\", 5432]")
    if not ports_value and not hosts:
        raise ConfigError(f"{where('ports')}: is empty; list at least one port or range")
    ports = tuple(parse_port_range(item, where("ports")) for item in ports_value)
    bind_value = table.get("bind")
    if bind_value is None:
        bind = tuple(default_bind)
    else:
        if not isinstance(bind_value, list) or not bind_value:
            raise ConfigError(
                f"{where('bind')}: must be a non-empty list of IP addresses, e.g. [\"0.0.0.0\", \"::\"]"
            )
        addresses = []
        for item in bind_value:
            if not isinstance(item, str):
                raise ConfigError(f"{where('bind')}: {item!r} is a {_type(item)}; write IP addresses as strings")
            try:
                addresses.append(str(ipaddress.ip_address(item.strip())))
            except ValueError:
                raise ConfigError(
                    f"{where('bind')}: {item!r} is not an IP address (e.g. 0.0.0.0, 127.0.0.1, ::)"
                ) from None
        bind = tuple(addresses)
    limits = {}
    for key, default in (("max_tunnels", default_max_tunnels), ("max_streams", default_max_streams)):
        value = table.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where(key)}: is a {_type(value)}; it must be a whole number >= 1")
        if value < 1:
            raise ConfigError(f"{where(key)}: {value} must be at least 1")
        limits[key] = value
    optional: dict[str, int | None] = {}
    for key in LIMIT_KEYS:
        value = table.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            unit = "connections" if key == "max_connections_per_tunnel" else "bytes per second"
            raise ConfigError(
                f"{where(key)}: {value!r} is not a whole number >= 1 ({unit}); leave it out for no limit"
            )
        optional[key] = value
    both = optional.pop("bandwidth")
    for key in ("bandwidth_to_client", "bandwidth_from_client"):
        if optional[key] is None:
            optional[key] = both
    return ClientPolicy(
        name=name,
        token_sha256=digests["token_sha256"],
        cert_sha256=digests["cert_sha256"],
        ports=ports,
        bind=bind,
        max_tunnels=limits["max_tunnels"],
        max_streams=limits["max_streams"],
        hosts=hosts,
        **optional,
    )


def _hosts(value: object, where: str) -> tuple[str, ...]:
    """A client's `hosts`: DNS names (or "*.zone"), normalised."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f'{where}: is a {_type(value)}; it must be a list, e.g. ["app.alice.example.com"]')
    names = []
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"{where}: {item!r} is a {_type(item)}; write hostnames as strings")
        try:
            names.append(normalise(item, wildcard=True))
        except BadHostname as e:
            raise ConfigError(f"{where}: {e}") from None
    return tuple(names)


def parse_clients(
    text: str, path: Path | str, *, default_bind: tuple[str, ...] = DEFAULT_BIND,
    default_max_tunnels: int = DEFAULT_MAX_TUNNELS, default_max_streams: int = DEFAULT_MAX_STREAMS,
) -> dict[str, ClientPolicy]:
    path = Path(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for key in data:
        if key != "clients":
            raise ConfigError(
                f"{path}: unknown top-level key {key!r}; the file holds only [clients.NAME] tables"
            )
    clients_table = data.get("clients", {})
    if not isinstance(clients_table, dict):
        raise ConfigError(f"{path}: 'clients' is a {_type(clients_table)}; write [clients.NAME] tables")
    clients: dict[str, ClientPolicy] = {}
    seen: dict[tuple[str, str], str] = {}
    for name, table in clients_table.items():
        policy = _validate_client(
            path, name, table, default_bind, default_max_tunnels, default_max_streams
        )
        for key, what in (("token_sha256", "token"), ("cert_sha256", "certificate")):
            value = getattr(policy, key)
            if value is None:
                continue
            if (key, value) in seen:
                raise ConfigError(
                    f"{path}: clients {seen[key, value]!r} and {name!r} have the same "
                    f"{key}; give each client its own {what}"
                )
            seen[key, value] = name
        clients[name] = policy
    return clients


def load_clients(
    path: Path | str, *, default_bind: tuple[str, ...] = DEFAULT_BIND,
    default_max_tunnels: int = DEFAULT_MAX_TUNNELS, default_max_streams: int = DEFAULT_MAX_STREAMS,
) -> dict[str, ClientPolicy]:
    """Read and validate a clients file (ConfigError says what is wrong)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: the clients file does not exist; create it with "
            f"'rtunnel_server add-client NAME --ports 4000-4099 --clients {path}'"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the clients file: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text (byte {e.start})") from None
    return parse_clients(
        text, path, default_bind=default_bind, default_max_tunnels=default_max_tunnels,
        default_max_streams=default_max_streams,
    )


# ---------------------------------------------------------------- adding


def _header(name: str) -> re.Pattern[str]:
    quoted = re.escape(name)
    return re.compile(
        rf"""^\s*\[\s*clients\s*\.\s*(?:{quoted}|"{quoted}"|'{quoted}')\s*\]\s*(?:\#.*)?$"""
    )


_ANY_HEADER = re.compile(r"^\s*\[")


def _without_client(text: str, name: str) -> str:
    """`text` minus the [clients.NAME] table (header to the next header)."""
    header = _header(name)
    out: list[str] = []
    skipping = False
    for line in text.splitlines(keepends=True):
        if header.match(line):
            skipping = True
            continue
        if skipping and _ANY_HEADER.match(line):
            skipping = False
        if not skipping:
            out.append(line)
    return "".join(out)


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def client_table(policy: ClientPolicy, write_bind: bool = True, write_limits: Iterable[str] = ()) -> str:
    lines = [f"[clients.{policy.name}]"]
    if policy.token_sha256 is not None:
        lines.append(f"token_sha256 = {_toml_str(policy.token_sha256)}")
    if policy.cert_sha256 is not None:
        lines.append(f"cert_sha256 = {_toml_str(policy.cert_sha256)}")
    ports = ", ".join(str(lo) if lo == hi else _toml_str(f"{lo}-{hi}") for lo, hi in policy.ports)
    lines.append(f"ports = [{ports}]")
    if write_bind:
        lines.append(f"bind = [{', '.join(_toml_str(b) for b in policy.bind)}]")
    for key in write_limits:
        lines.append(f"{key} = {getattr(policy, key)}")
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, mode 0600 (it holds token hashes)."""
    try:
        replace_private(path, text.encode("utf-8"))
    except OSError as e:
        raise StateDirError(_cannot_write(path, e)) from None


def _cannot_write(path: Path, e: OSError) -> str:
    why = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "no space left on the device"
    return f"cannot write {path}: {why}; free space or choose another path (--clients FILE)"


def add_client(
    path: Path | str,
    name: str,
    ports: Iterable[tuple[int, int]],
    bind: Iterable[str] | None = None,
    max_tunnels: int | None = None,
    max_streams: int | None = None,
    bandwidth: int | None = None,
    max_connections_per_tunnel: int | None = None,
) -> str:
    """Add (or replace) client `name` in the clients file; return its new token.

    Only the token's SHA-256 is written. The rest of the file (other clients,
    comments) is kept; the result is validated before it replaces the file.
    """
    path = Path(path)
    ports = tuple(ports)
    if not _NAME.match(name) or name in RESERVED_NAMES:
        raise ConfigError(
            f"client name {name!r}: use 1-64 letters, digits, '_' or '-' (and not 'default')"
        )
    if not ports:
        raise ConfigError(f"client {name!r}: give the ports it may open, e.g. --ports 4000-4099")
    if path.exists():
        try:
            existing = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the clients file: {e}") from None
        parse_clients(existing, path)  # refuse to touch a file that is already broken
    else:
        existing = ""
    token = secrets.token_urlsafe(24)
    policy = ClientPolicy(
        name=name,
        token_sha256=hashlib.sha256(token.encode()).hexdigest(),
        ports=ports,
        bind=tuple(bind) if bind else DEFAULT_BIND,
        max_tunnels=max_tunnels or DEFAULT_MAX_TUNNELS,
        max_streams=max_streams or DEFAULT_MAX_STREAMS,
    )
    limits = [k for k, v in (("max_tunnels", max_tunnels), ("max_streams", max_streams)) if v is not None]
    rest = _without_client(existing, name).rstrip("\n")
    table = client_table(policy, write_bind=bool(bind), write_limits=limits)
    for key, value in (("bandwidth", bandwidth), ("max_connections_per_tunnel", max_connections_per_tunnel)):
        if value is not None:
            table += f"{key} = {value}\n"
    text = (rest + "\n\n" if rest else "") + table
    try:
        parse_clients(text, path)
    except ConfigError as e:
        raise ConfigError(
            f"{path}: cannot add client {name!r} automatically ({e}); edit the file by hand"
        ) from None
    write_atomically(path, text)
    return token


__all__ = [
    "DEFAULT_BIND",
    "ClientPolicy",
    "add_client",
    "authenticate",
    "authenticate_certificate",
    "cert_digest",
    "load_clients",
    "parse_clients",
    "parse_port_range",
]
