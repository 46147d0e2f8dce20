"""The errors a user can see. Each carries the sentence they should read."""

from __future__ import annotations


class RtunnelError(Exception):
    """Base of every error rtunnel reports to a user (never a traceback)."""


class ConfigError(RtunnelError):
    """An option, file or value is wrong; the message says which and why."""


class StateDirError(RtunnelError):
    """The state directory cannot be created, read or written."""

