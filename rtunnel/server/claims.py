"""The claims registry: which holder owns each public name.

A public name is what a client asks the server to open for it: a TCP port,
a UDP port or a hostname. Names belong to credentials. Among
the holders (server sessions) of one credential the newest holds a name;
an older one that asks for it waits, and the newest waiting holder gets it
when the holder lets go. Another credential never gets a claimed name, also
while its holder is detached.

The session and port code talk only to ClaimRegistry, so a distributed
implementation (one registry for a fleet of servers) can replace LocalClaims
without touching them. The registry knows no sockets: the caller opens and
closes whatever serves a name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


@dataclass(frozen=True, slots=True)
class TcpPort:
    """A public TCP port on one bind address (an IP literal)."""

    host: str
    port: int

    def describe(self) -> str:
        return f"port {self.port} on {self.host}"


@dataclass(frozen=True, slots=True)
class UdpPort:
    """A public UDP port on one bind address (an IP literal)."""

    host: str
    port: int

    def describe(self) -> str:
        return f"UDP port {self.port} on {self.host}"


@dataclass(frozen=True, slots=True)
class Hostname:
    """A public hostname on the server's shared HTTP/HTTPS ports, already
    normalised (lower case, IDNA A-labels, no trailing dot). One claim
    covers HTTP, HTTPS and TLS passthrough for the name; a wildcard
    ("*.alice.example.com") is a name of its own."""

    name: str

    def describe(self) -> str:
        return f"hostname {self.name}"


#: Every kind of public name.
Name = TcpPort | UdpPort | Hostname


class Holder(Protocol):
    """What the registry needs of a claimant (a server session)."""

    @property
    def credential(self) -> str:
        """Whose the names it claims are."""

    @property
    def serial(self) -> int:
        """Creation order: among holders of a credential the newest holds a name."""

    def still_wants(self, tag: int) -> bool:
        """True if this holder, waiting for a name as `tag`, can take it now."""


H = TypeVar("H", bound=Holder)


@dataclass(frozen=True, slots=True)
class Claim(Generic[H]):
    """`holder` holds `name`, calling it `tag` (its tunnel id)."""

    name: Name
    holder: H
    tag: int

    @property
    def credential(self) -> str:
        return self.holder.credential


@dataclass(frozen=True, slots=True)
class Claimed(Generic[H]):
    """The outcome of a granted claim: `previous` is the claim of the same
    credential it replaced (the caller hands over what serves the name), or
    None if the name was free (the caller starts serving it)."""

    claim: Claim[H]
    previous: Claim[H] | None


class ClaimRefused(Exception):
    """A claim the registry cannot grant. `code` is the BIND_FAILED code:
    IN_USE (another credential holds the name) or TAKEN_OVER (a newer holder
    of the same credential does; the claimant now waits for it), or, in a
    fleet, UNAVAILABLE (etcd cannot be reached: retry later). `repeated`:
    the claimant was already waiting so (a retry)."""

    IN_USE = "in_use"
    TAKEN_OVER = "taken_over"
    UNAVAILABLE = "unavailable"  # a fleet's registry cannot reach etcd: retry later

    def __init__(self, code: str, name: Name, repeated: bool = False) -> None:
        super().__init__(f"{name.describe()}: {code}")
        self.code = code
        self.name = name
        self.repeated = repeated


class ClaimRegistry(Protocol[H]):
    """Who holds each public name. Every method is synchronous."""

    def claim(self, name: Name, holder: H, tag: int) -> Claimed[H]:
        """Take `name` for `holder` as `tag`: new if free; handed over if an
        older (or the same) holder of the same credential has it, which then
        waits for it back; raise ClaimRefused otherwise."""

    def release(self, claim: Claim[H], hand_on: bool = True) -> Claim[H] | None:
        """Give `claim` up. With `hand_on`, the newest holder of the same
        credential waiting for the name gets it: its new claim is returned.
        None: the name is free (its waiters are forgotten; they ask again)."""

    def transfer(self, claim: Claim[H], to: H, tag: int) -> Claim[H]:
        """Hand `claim` to `to`, a holder of the same credential (ValueError otherwise)."""

    def owner(self, name: Name) -> str | None:
        """The credential holding `name`, if any."""

    def holder(self, name: Name) -> H | None:
        """The holder of `name`, if any."""

    def waiting(self, name: Name) -> Mapping[H, int]:
        """The holders waiting for `name`, each with its tag."""

    def stop_waiting(self, holder: H, tag: int | None = None) -> None:
        """`holder` no longer waits for any name as `tag` (None: as any tag)."""


class LocalClaims(Generic[H]):
    """ClaimRegistry for one server process: two dicts. Invariant: only
    claimed names have waiters, and all of them are of the holder's
    credential."""

    def __init__(self) -> None:
        self._claims: dict[Name, Claim[H]] = {}
        self._waiting: dict[Name, dict[H, int]] = {}

    def claim(self, name: Name, holder: H, tag: int) -> Claimed[H]:
        held = self._claims.get(name)
        if held is None:
            claim = self._claims[name] = Claim(name, holder, tag)
            self.stop_waiting(holder, tag)
            return Claimed(claim, None)
        if held.credential != holder.credential:
            raise ClaimRefused(ClaimRefused.IN_USE, name)
        if held.holder.serial > holder.serial:
            waiters = self._waiting.setdefault(name, {})
            repeated = waiters.get(holder) == tag
            waiters[holder] = tag
            raise ClaimRefused(ClaimRefused.TAKEN_OVER, name, repeated)
        claim = self.transfer(held, holder, tag)
        if held.holder is not holder:  # the displaced holder waits to get it back
            self._waiting.setdefault(name, {})[held.holder] = held.tag
        return Claimed(claim, held)

    def release(self, claim: Claim[H], hand_on: bool = True) -> Claim[H] | None:
        name = claim.name
        if self._claims.get(name) is not claim:
            return None  # released or handed on already
        waiters = self._waiting.get(name, {}) if hand_on else {}
        heirs = [h for h, tag in waiters.items() if h is not claim.holder and h.still_wants(tag)]
        if heirs:
            heir = max(heirs, key=lambda h: h.serial)
            return self.transfer(claim, heir, waiters[heir])
        del self._claims[name]
        self._waiting.pop(name, None)
        return None

    def transfer(self, claim: Claim[H], to: H, tag: int) -> Claim[H]:
        if to.credential != claim.credential:
            raise ValueError(f"{claim.name.describe()} belongs to {claim.credential}, not to {to.credential}")
        if self._claims.get(claim.name) is not claim:
            raise ValueError(f"{claim.name.describe()}: that claim is no longer current")
        new = self._claims[claim.name] = Claim(claim.name, to, tag)
        self.stop_waiting(to, tag)
        return new

    def current(self, name: Name) -> Claim[H] | None:
        """The claim on `name`, if any."""
        return self._claims.get(name)

    def owner(self, name: Name) -> str | None:
        held = self._claims.get(name)
        return held.credential if held is not None else None

    def holder(self, name: Name) -> H | None:
        held = self._claims.get(name)
        return held.holder if held is not None else None

    def waiting(self, name: Name) -> Mapping[H, int]:
        return dict(self._waiting.get(name, {}))

    def stop_waiting(self, holder: H, tag: int | None = None) -> None:
        for name in [n for n, waiters in self._waiting.items() if holder in waiters]:
            waiters = self._waiting[name]
            if tag is None or waiters[holder] == tag:
                del waiters[holder]
            if not waiters:
                del self._waiting[name]
