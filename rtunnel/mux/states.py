"""The stream's state machines: one enum and one transition table each.

A stream has three: its send direction (which reads the local socket), its
receive direction (which writes it), and the local socket itself. Every
change of state goes through `move`, which raises `IllegalTransition` for a
change the table does not list: a bug in the mux, never the peer's doing
(the peer's mistakes are `ProtocolViolation`s, found before any state
changes).

docs/architecture.md ("State machines") lists these tables;
tests/test_mux.py checks that the page and the tables agree.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar


class IllegalTransition(RuntimeError):
    """A state machine was asked for a change its table does not allow."""


class SendState(enum.Enum):
    """The send direction: local socket -> DATA frames -> the peer."""

    READING = "reading"  # open; its local socket is read
    PAUSED = "paused"  # open; its local socket is not read (no credit, link paused or gone, budget full)
    FIN_SENT = "fin-sent"  # local EOF seen; FIN queued, bytes may still be unacknowledged
    DONE = "done"  # the peer consumed every byte up to the FIN
    CLOSED = "closed"  # the stream is over (both directions done, or reset); forgotten


class RecvState(enum.Enum):
    """The receive direction: DATA frames from the peer -> the local socket."""

    OPEN = "open"
    FIN_RECEIVED = "fin-received"  # final offset known, bytes may still be arriving
    DONE = "done"  # every byte delivered, local socket half-closed
    CLOSED = "closed"  # the stream is over; forgotten


class LocalState(enum.Enum):
    """The stream's local socket (visitor or target), as the stream sees it."""

    PENDING = "pending"  # not connected yet: the peer's bytes wait in the stream
    WRITABLE = "writable"  # connected; credit flows as bytes are handed to it
    FULL = "full"  # its send buffer is full: no credit until it drains
    GONE = "gone"  # lost, or handed to another stream


_ANY_SEND = (SendState.READING, SendState.PAUSED, SendState.FIN_SENT, SendState.DONE)
_ANY_RECV = (RecvState.OPEN, RecvState.FIN_RECEIVED, RecvState.DONE)

#: state -> the states it may change to (the stream moves both directions to
#: CLOSED together, from any state: a reset, or both directions DONE)
SEND_TRANSITIONS: Mapping[SendState, frozenset[SendState]] = {
    SendState.READING: frozenset({SendState.PAUSED, SendState.FIN_SENT, SendState.CLOSED}),
    SendState.PAUSED: frozenset({SendState.READING, SendState.FIN_SENT, SendState.CLOSED}),
    SendState.FIN_SENT: frozenset({SendState.DONE, SendState.CLOSED}),
    SendState.DONE: frozenset({SendState.CLOSED}),
    SendState.CLOSED: frozenset(),
}

RECV_TRANSITIONS: Mapping[RecvState, frozenset[RecvState]] = {
    RecvState.OPEN: frozenset({RecvState.FIN_RECEIVED, RecvState.CLOSED}),
    RecvState.FIN_RECEIVED: frozenset({RecvState.DONE, RecvState.CLOSED}),
    RecvState.DONE: frozenset({RecvState.CLOSED}),
    RecvState.CLOSED: frozenset(),
}

LOCAL_TRANSITIONS: Mapping[LocalState, frozenset[LocalState]] = {
    LocalState.PENDING: frozenset({LocalState.WRITABLE}),
    LocalState.WRITABLE: frozenset({LocalState.FULL, LocalState.GONE}),
    LocalState.FULL: frozenset({LocalState.WRITABLE, LocalState.GONE}),
    LocalState.GONE: frozenset(),
}

State = TypeVar("State", bound=enum.Enum)  # SendState, RecvState, LocalState, the link's LinkState


def move(table: Mapping[State, frozenset[State]], old: State, new: State, what: object) -> State:
    """`new`, if `table` allows `old` -> `new`; else raise IllegalTransition."""
    if new not in table[old]:
        raise IllegalTransition(f"{what}: {type(old).__name__} {old.name} -> {new.name} is not allowed")
    return new


def describe(table: Mapping[State, frozenset[State]]) -> list[str]:
    """The table as lines `OLD -> NEW1, NEW2` (terminal states omitted), in
    declaration order: what docs/architecture.md lists."""
    lines = []
    for old, targets in table.items():
        if targets:
            ordered = [state.name for state in type(old) if state in targets]
            lines.append(f"{old.name} -> {', '.join(ordered)}")
    return lines
