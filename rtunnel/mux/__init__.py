"""The multiplexer: one Session type used by both ends, sans-IO.

A Session (rtunnel.mux.session) carries many Streams (rtunnel.mux.stream)
over one link at a time, with credit-based flow control, a reliable-frame
log for replay (rtunnel.mux.reliable), one memory budget
(rtunnel.mux.budget) and the resume procedure of docs/protocol.md. The
package imports no Twisted: it talks to its link, its local sockets and
time only through the interfaces of rtunnel.mux.ports, which
rtunnel.link and rtunnel.localsocket implement over Twisted.
"""

from __future__ import annotations

from typing import Any

from rtunnel.mux.budget import Budget
from rtunnel.mux.errors import ProtocolViolation, SessionBufferFull, StreamIdsExhausted
from rtunnel.mux.ports import Cancellable, EventLog, LinkPort, LocalPort, Timers, cancel_call
from rtunnel.mux.reliable import RELIABLE_ENTRY_OVERHEAD, ReliableLog
from rtunnel.mux.session import Link, Session, SessionDelegate
from rtunnel.mux.settings import READ_SIZE, SessionSettings
from rtunnel.mux.states import IllegalTransition, LocalState, RecvState, SendState
from rtunnel.mux.stream import Stream

__all__ = [
    "READ_SIZE",
    "RELIABLE_ENTRY_OVERHEAD",
    "Budget",
    "Cancellable",
    "EventLog",
    "IllegalTransition",
    "Link",
    "LinkPort",
    "LocalPort",
    "LocalState",
    "ProtocolViolation",
    "RecvState",
    "ReliableLog",
    "SendState",
    "Session",
    "SessionBufferFull",
    "SessionDelegate",
    "SessionSettings",
    "Stream",
    "StreamIdsExhausted",
    "Timers",
    "cancel_call",
]

#: Names that moved to the Twisted adapters; still importable from here
#: (looked up on first use, so importing rtunnel.mux imports no Twisted).
_MOVED = {"StreamProtocol": "rtunnel.localsocket", "set_nodelay": "rtunnel.transports"}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module 'rtunnel.mux' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
