"""ACME certificates at every member (docs/fleet.md "Certificates at every member").

A hostname's ACME certificate is ordered and stored by the member holding
the name (its home, rtunnel.server.acme). An edge member that terminates
HTTPS for the name fetches the home's key and chain over the member link
(mutual TLS between members) and keeps them in memory only:

* the edge opens a stream on its link to the home with OPEN `name`
  `{"kind": "host", "hostname": H}` and `"via": "cert"` (no visitor: `src`
  and `dst` are `["0.0.0.0", 0]`) and half-closes it at once;
* the home (`answer`) writes the PEM key + chain and FIN only if it holds
  H with kind http and its certificate source has a certificate for H; else
  it resets the stream (REFUSED, with why). A home of an older version takes
  `via` "cert" for passthrough bytes to an http tunnel and resets it too;
* the edge serves the certificate only while the directory says H is held
  at that home with kind http: released or moved, it is forgotten at once
  (and fetched from the new home).

When: as soon as the directory says H is held at another member (kind
http, not a wildcard), when the link to that member comes up, after a
failure (back-off 5 s doubling to 5 min), every hour (a renewal at the home
reaches the edges within the hour), and on an SNI miss for H (at most once
per name every `MISS_EVERY` seconds: a flood of ClientHellos makes no
more fetches than that). At most `MAX_FETCHING` fetches run at once; a
name the directory does not say is held elsewhere is never fetched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from rtunnel.mux import SessionBufferFull, Stream, StreamIdsExhausted, cancel_call
from rtunnel.server.acme import NameCertificate, load_name_certificate
from rtunnel.wire import ResetCode

if TYPE_CHECKING:
    from OpenSSL import SSL

    from rtunnel.fleet.links import FleetLinks

#: a key and a chain are a few KiB; a longer answer is not one
MAX_ANSWER = 64 * 1024
#: a fetch not answered within this many seconds is abandoned (and retried)
FETCH_TIMEOUT = 15.0
#: a certificate held here is fetched again this often (a renewal at the home arrives within it)
REFRESH_EVERY = 3600.0
#: after a failed fetch: first retry, doubling up to the most
RETRY_FIRST, RETRY_MOST = 5.0, 300.0
#: an SNI miss fetches a name at most once in this many seconds
MISS_EVERY = 10.0
#: fetches in flight at once, all names together
MAX_FETCHING = 8
#: OPEN's `via` of a certificate fetch on a member link
VIA_CERT = "cert"
_NO_ADDRESS = ["0.0.0.0", 0]


class _Fetch:
    """The edge's end of one fetch: the LocalPort of its member-link stream,
    collecting the home's answer (bounded) until the home's FIN."""

    def __init__(self, share: CertificateShare, name: str, home: str) -> None:
        self.share = share
        self.name = name
        self.home = home
        self.stream: Stream | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.over = False
        self.timer: IDelayedCall | None = None

    def bind(self, stream: Stream) -> None:
        self.stream = stream

    def write(self, data: bytes) -> None:
        if self.over:
            return
        self.size += len(data)
        if self.size > MAX_ANSWER:
            self._fail(f"its answer is over {MAX_ANSWER} bytes")
            return
        self.chunks.append(data)

    def half_close(self) -> None:
        """The home's FIN: its whole answer is here."""
        if self.over:
            return
        self.over = True
        cancel_call(self.timer)
        self.share.fetched(self, b"".join(self.chunks))

    def abort(self) -> None:
        self._end_failed("it refused (it does not hold the name with a certificate now, or it is cut off from "
                         "etcd) or the member link dropped")

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def timed_out(self) -> None:
        self.timer = None
        self._fail(f"no answer within {FETCH_TIMEOUT:g} s")

    def _fail(self, why: str) -> None:
        stream = self.stream
        self._end_failed(why)
        if stream is not None and not stream.closed:
            stream.reset(ResetCode.ABORTED, f"certificate fetch abandoned: {why}")

    def _end_failed(self, why: str) -> None:
        if self.over:
            return
        self.over = True
        cancel_call(self.timer)
        self.share.failed(self, why)

    def cancel(self) -> None:
        """The name moved on or the edge stops: drop the fetch, report nothing."""
        self.over = True
        cancel_call(self.timer)
        if self.stream is not None and not self.stream.closed:
            self.stream.reset(ResetCode.ABORTED, "certificate no longer wanted")


class _Answer:
    """The home's end of a fetch: the answer is written at once; what the
    edge sends (nothing but its FIN) is ignored."""

    def bind(self, stream: Stream) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def half_close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class CertificateShare:
    """The certificates of names held at other members, fetched from their
    homes and kept in memory here (the edge), and the home's answer to
    other edges' fetches."""

    log = Logger()

    def __init__(self, links: FleetLinks, local: Any) -> None:
        self.links = links
        self.local = local  # this member's own certificate source (may be None)
        self.wanted: dict[str, str] = {}  # name -> home: held there with kind http
        self.held: dict[str, tuple[str, NameCertificate]] = {}  # name -> (home it came from, certificate)
        self.fetching: dict[str, _Fetch] = {}
        self.next_fetch: dict[str, IDelayedCall] = {}
        self.failures: dict[str, int] = {}
        self.last_miss: dict[str, float] = {}
        self.fetches = 0  # fetches started (tests, and a bound an SNI flood cannot raise)
        self.stopped = False
        links.on_link_up.append(self._link_up)

    def stop(self) -> None:
        self.stopped = True
        if self._link_up in self.links.on_link_up:
            self.links.on_link_up.remove(self._link_up)
        self.held.clear()  # forgotten without a log line each: the member stops
        for name in list(self.wanted):
            self.released(name)

    # ------------------------------------------------------------ what the directory says

    def held_at(self, name: str, home: str) -> None:
        """`name` is held at `home` with kind http: serve its certificate here."""
        if self.stopped or name.startswith("*."):
            return  # a wildcard is never ordered over ACME: nothing to fetch
        if self.wanted.get(name) == home:
            return
        self.released(name)
        self.wanted[name] = home
        if self._needed(name):
            self._fetch(name)

    def released(self, name: str) -> None:
        """`name` is no longer held at the home we knew: forget its certificate."""
        self.wanted.pop(name, None)
        if self.held.pop(name, None) is not None:
            self.log.info(
                "forgot the certificate of hostname {hostname}: it is no longer held at the member it came from",
                hostname=name, event="edge_certificate_forgotten",
            )
        fetch = self.fetching.pop(name, None)
        if fetch is not None:
            fetch.cancel()
        cancel_call(self.next_fetch.pop(name, None))
        self.failures.pop(name, None)
        self.last_miss.pop(name, None)

    # ------------------------------------------------------------ the edge's TLS handshakes

    def context_for(self, name: str) -> SSL.Context | None:
        """The certificate fetched for `name`, only while it is held (kind http)
        at the member it came from."""
        held = self.held.get(name)
        if held is None or self.wanted.get(name) != held[0]:
            return None
        return held[1].context

    def missed(self, name: str) -> None:
        """A ClientHello for `name` found no certificate: fetch it now, if the
        name is held elsewhere and it was not asked for in the last MISS_EVERY s."""
        if name not in self.wanted or name in self.fetching:
            return
        now = self.links.reactor.seconds()
        if now - self.last_miss.get(name, -MISS_EVERY) < MISS_EVERY:
            return
        self.last_miss[name] = now
        self._fetch(name)

    # ------------------------------------------------------------ fetching

    def _needed(self, name: str) -> bool:
        """Whether this member needs the home's certificate for `name`: not if
        its own source covers it and obtains nothing (e.g. a wildcard
        --https-cert on every member)."""
        local = self.local
        if local is None or hasattr(local, "certificate_pem"):
            return True
        return local.context_for(name) is None

    def _fetch(self, name: str) -> None:
        cancel_call(self.next_fetch.pop(name, None))
        home = self.wanted.get(name)
        if home is None or name in self.fetching or self.stopped:
            return
        if len(self.fetching) >= MAX_FETCHING:
            self._later(name, 1.0)
            return
        session = self.links.peer(home).session
        if session is None:
            return  # fetched when the link to the home is up (_link_up; the peer dials it now)
        fetch = _Fetch(self, name, home)
        info = {
            "name": {"kind": "host", "hostname": name}, "src": _NO_ADDRESS, "dst": _NO_ADDRESS,
            "edge": self.links.member, "via": VIA_CERT,
        }
        try:
            stream = session.open_stream(0, info)
        except (SessionBufferFull, StreamIdsExhausted) as e:
            self._retry(name, home, str(e))
            return
        self.fetches += 1
        self.fetching[name] = fetch
        fetch.timer = self.links.reactor.callLater(FETCH_TIMEOUT, fetch.timed_out)
        stream.attach_local(fetch)
        stream.local_eof()  # the edge sends nothing

    def _later(self, name: str, delay: float) -> None:
        cancel_call(self.next_fetch.pop(name, None))
        self.next_fetch[name] = self.links.reactor.callLater(delay, self._fetch, name)

    def _link_up(self, home: str, session: Any) -> None:
        """The link to `home` is up: fetch what waited for it (a name without
        a certificate, or one whose refresh found the link down)."""
        for name, where in list(self.wanted.items()):
            if where != home or name in self.fetching or not self._needed(name):
                continue
            if name not in self.held or name not in self.next_fetch:
                self._fetch(name)

    def fetched(self, fetch: _Fetch, pem: bytes) -> None:
        if self.fetching.get(fetch.name) is not fetch:
            return
        del self.fetching[fetch.name]
        if self.wanted.get(fetch.name) != fetch.home:
            return
        try:
            certificate = load_name_certificate(fetch.name, pem)
        except ValueError as e:
            self.failed(fetch, f"its answer is not a key and certificate for the name ({e})")
            return
        old = self.held.get(fetch.name)
        self.held[fetch.name] = (fetch.home, certificate)
        self.failures.pop(fetch.name, None)
        self._later(fetch.name, REFRESH_EVERY)
        if old is None or old[1].serial != certificate.serial:
            self.log.info(
                "certificate for hostname {hostname} fetched from member {home} (serial {serial}); "
                "serving HTTPS for it here", hostname=fetch.name, home=fetch.home,
                serial=f"{certificate.serial:x}", not_after=certificate.not_after,
                event="edge_certificate_fetched", member=fetch.home,
            )

    def failed(self, fetch: _Fetch, why: str) -> None:
        if self.fetching.get(fetch.name) is not fetch:
            return
        del self.fetching[fetch.name]
        if self.wanted.get(fetch.name) != fetch.home or self.stopped:
            return
        self._retry(fetch.name, fetch.home, why)

    def _retry(self, name: str, home: str, why: str) -> None:
        """Back off (5 s doubling to 5 min) and ask again."""
        failures = self.failures.get(name, 0) + 1
        self.failures[name] = failures
        delay = min(RETRY_FIRST * 2 ** (failures - 1), RETRY_MOST)
        self._later(name, delay)
        serving = name in self.held
        self.log.warn(
            "cannot fetch the certificate of hostname {hostname} from member {home}: {why}; asking again in "
            "{retry_in:.0f} s{serving}", hostname=name, home=home, why=why, retry_in=delay,
            serving=" (the one fetched before keeps serving)" if serving else "",
            event="edge_certificate_fetch_failed", member=home,
        )

    # ------------------------------------------------------------ the home

    def answer(self, hop: Stream, name: str, edge: str) -> None:
        """An edge asks for the certificate of `name`: the key and chain if
        this member holds the name with kind http and has one; else RST."""
        tunnel = self.links.server.hostnames.tunnels.get(name)
        if tunnel is None or tunnel.claim is None or tunnel.owner is None or tunnel.kind != "http":
            hop.reset(ResetCode.REFUSED, f"hostname {name[:253]} is not held at member {self.links.member} "
                      "as an http tunnel")
            return
        source = self.local
        pem_of = getattr(source, "certificate_pem", None)
        pem = pem_of(name) if pem_of is not None else None
        if pem is None:
            hop.reset(ResetCode.REFUSED, f"member {self.links.member} has no certificate of its own for {name} now")
            return
        hop.attach_local(_Answer())
        if hop.closed:
            return
        hop.local_data(pem)
        hop.local_eof()
        self.log.info(
            "gave the certificate of hostname {hostname} to member {edge}", hostname=name, edge=edge,
            event="certificate_shared", member=edge,
        )
