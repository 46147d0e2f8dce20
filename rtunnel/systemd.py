"""Socket activation: check `--listen systemd:…` at start, with a sentence.

Twisted's `systemd:` endpoint looks the socket up when the endpoint string
is parsed, and fails with a bare IndexError or KeyError when this process
did not inherit it (Twisted reads, then removes, LISTEN_FDS and LISTEN_PID
from the environment when it is imported, so the lookup is the check).
"""

from __future__ import annotations

from rtunnel.endpoints import endpoint_error
from rtunnel.errors import ConfigError


def check_inherited_socket(listen: str) -> None:
    """Raise ConfigError unless `listen` (a `systemd:` endpoint string) names
    a socket this process inherited."""
    error = endpoint_error(listen)  # only looks the descriptor up
    if error is not None:
        raise ConfigError(
            f"--listen {listen}: this process did not inherit that socket ({error}). "
            "systemd passes sockets (LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID) when it starts the "
            "service for its .socket unit: start it that way, check the unit's "
            "FileDescriptorName= against name=, or listen with --port/--interface"
        )
