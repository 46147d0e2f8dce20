"""Twisted server endpoint strings given as options, checked while the
options are parsed.

`serverFromString(None, text)` builds the endpoint without a reactor (it is
only stored), so a wrong `--admin`, `--metrics` or `--listen` is a usage
error before anything listens.
"""

from __future__ import annotations

from twisted.internet.endpoints import serverFromString

from rtunnel.errors import ConfigError

# what endpoint parsers raise: an unknown type or bad value (ValueError), a
# bad keyword or IPv6 colons left unescaped (TypeError), a `systemd:` socket
# not inherited (IndexError, KeyError), an `ssl:` key file missing (OSError)
PARSE_ERRORS = (ValueError, TypeError, IndexError, KeyError, OSError)


def endpoint_error(text: str) -> str | None:
    """Why `text` is not a Twisted server endpoint string ("TypeError: …"),
    or None if it is one."""
    try:
        serverFromString(None, text)
    except PARSE_ERRORS as e:
        return f"{type(e).__name__}: {e}"
    return None


def local_endpoint(value: str, option: str, example: int) -> str:
    """The endpoint string of an option such as `--admin VALUE`: a bare
    port means that port on 127.0.0.1 (`tcp:PORT:interface=127.0.0.1`);
    anything else must be a Twisted server endpoint string (`example` is
    the port the error message suggests). Raises
    ConfigError naming the option and what to give instead."""
    value = value.strip()
    if value.isdigit():
        port = int(value)
        if not 0 <= port <= 65535:
            raise ConfigError(f"{option} {value}: port {port} is outside 0-65535; give a port number")
        return f"tcp:{port}:interface=127.0.0.1"
    error = endpoint_error(value)
    if error is not None:
        raise ConfigError(
            f"{option} {value!r} is not a Twisted server endpoint ({error}); give a port "
            f"(e.g. {example}, on 127.0.0.1) or an endpoint string like "
            f"tcp:{example}:interface=0.0.0.0 (write IPv6 colons as \\:, e.g. interface=\\:\\:1)"
        )
    return value
