"""A small etcd v3 client over etcd's documented JSON gateway, on treq.

Only what the fleet needs: range, put, delete, txn, leases (grant,
keepalive, revoke) and a streaming watch that resumes from the last
revision it saw after a disconnect. No consensus code of our own: etcd
decides, we ask it.

Every call has a timeout. With several URLs (`--fleet-etcd URL,URL,...`,
the members of one etcd cluster) a call that cannot reach one URL (refused,
timed out, 5xx) is tried at the next; the URL that answered last is tried
first next time. An error names the URL(s) and what to check.

Every call is timed into EtcdStats (count, errors, seconds, a latency
histogram per operation), which rtunnel.fleet.metrics exports.
"""

from __future__ import annotations

import base64
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import treq
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from rtunnel.errors import RtunnelError
from rtunnel.fleet.etcdtls import EtcdTls

DEFAULT_TIMEOUT = 2.0  # seconds per call and URL
#: the latency histogram's upper bounds, seconds
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
WATCH_RETRY = (0.2, 2.0)  # first and longest delay before a watch reconnects


def b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def unb64(data: str | None) -> bytes:
    return base64.b64decode(data) if data else b""


def prefix_end(prefix: str) -> str:
    """The range_end that makes `prefix` a prefix query (etcd's rule: the
    prefix with its last byte plus one), base64."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b64(b"\0")
    raw[-1] += 1
    return b64(bytes(raw))


class EtcdError(RtunnelError):
    """etcd refused or failed a call: names the URL, the call and what to do."""

    def __init__(self, message: str, url: str = "", code: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.code = code  # etcd's gRPC code, if it answered one (5: not found)


def range_kvs(responses: list[dict[str, Any]]) -> list[KeyValue]:
    """The keys a txn's first response (a request_range) read."""
    if not responses:
        return []
    return [KeyValue.parse(kv) for kv in responses[0].get("response_range", {}).get("kvs", [])]


class EtcdUnavailable(EtcdError):
    """No URL answered the call (connection refused, timed out, 5xx)."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as etcd holds it."""

    key: str
    value: bytes
    create_revision: int = 0
    mod_revision: int = 0
    lease: int = 0

    @classmethod
    def parse(cls, kv: dict[str, Any]) -> KeyValue:
        return cls(
            unb64(kv.get("key")).decode("utf-8", "replace"), unb64(kv.get("value")),
            int(kv.get("create_revision", 0)), int(kv.get("mod_revision", 0)), int(kv.get("lease", 0)),
        )

    def json(self) -> Any:
        """The value as JSON (None if it is not JSON)."""
        try:
            return json.loads(self.value)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A key put (`deleted` False, `kv` the new value) or deleted."""

    kv: KeyValue
    deleted: bool


@dataclass
class EtcdStats:
    """What every etcd call cost, per operation (for the metrics)."""

    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    buckets: dict[str, list[int]] = field(default_factory=dict)  # op -> counts per LATENCY_BUCKETS (+Inf last)

    def record(self, op: str, seconds: float, failed: bool) -> None:
        self.calls[op] += 1
        self.errors[op] += failed
        self.seconds[op] += seconds
        counts = self.buckets.setdefault(op, [0] * (len(LATENCY_BUCKETS) + 1))
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                counts[i] += 1
                break
        else:
            counts[-1] += 1


def compare_create(key: str, revision: int = 0) -> dict[str, Any]:
    """Compare: `key`'s create_revision is `revision` (0: the key is absent)."""
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": str(revision)}


def compare_mod(key: str, revision: int) -> dict[str, Any]:
    """Compare: `key` was last changed at `revision`."""
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def compare_value(key: str, value: bytes) -> dict[str, Any]:
    """Compare: `key` holds exactly `value`."""
    return {"key": b64(key), "target": "VALUE", "result": "EQUAL", "value": b64(value)}


def op_put(key: str, value: bytes, lease: int = 0) -> dict[str, Any]:
    put: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        put["lease"] = str(lease)
    return {"request_put": put}


def op_range(key: str) -> dict[str, Any]:
    return {"request_range": {"key": b64(key)}}


def op_delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}


@implementer(IStreamClientEndpoint)
class _QuietEndpoint:
    """An endpoint whose connections' factories do not log each start and stop."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[Any]:
        factory.noisy = False  # type: ignore[attr-defined]
        return self._endpoint.connect(factory)


@implementer(IAgentEndpointFactory)
class _QuietEndpoints:
    """The Agent's endpoints to etcd: TCP (TLS for https://), with a connect timeout, quiet."""

    def __init__(self, reactor: Any, timeout: float, tls: EtcdTls | None = None) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.tls = tls or EtcdTls()

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii") if isinstance(uri.host, bytes) else uri.host
        endpoint: IStreamClientEndpoint = HostnameEndpoint(self.reactor, host, uri.port, timeout=self.timeout)
        if uri.scheme in (b"https", "https"):
            endpoint = wrapClientTLS(self.tls.creator(host), endpoint)
        return _QuietEndpoint(endpoint)


class EtcdClient:
    """Calls to an etcd cluster's JSON gateway, each with a timeout, trying
    the cluster's URLs in turn. `close()` ends its connections (and watches)."""

    log = Logger()

    def __init__(
        self, reactor: Any, urls: Sequence[str], timeout: float = DEFAULT_TIMEOUT, tls: EtcdTls | None = None,
    ) -> None:
        if not urls:
            raise ValueError("give at least one etcd URL")
        self.reactor = reactor
        self.urls = [url.rstrip("/") for url in urls]
        self.timeout = timeout
        self.stats = EtcdStats()
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 8
        self._pool.retryAutomatically = False
        self._http = treq.client.HTTPClient(
            Agent.usingEndpointFactory(reactor, _QuietEndpoints(reactor, timeout, tls), pool=self._pool)
        )
        self._current = 0  # index of the URL that answered last
        self._watches: set[Watch] = set()
        self._inflight: set[defer.Deferred[None]] = set()  # one per call under way
        self.closed = False

    def describe(self) -> str:
        return ", ".join(self.urls)

    # ------------------------------------------------------------ calls

    @defer.inlineCallbacks
    def call(self, op: str, path: str, body: dict[str, Any]) -> Any:
        """POST `body` to `path` (e.g. "/v3/kv/range") at the first URL
        that answers; its JSON. EtcdError if etcd refuses (4xx: that
        answer), EtcdUnavailable if no URL answered."""
        failures: list[str] = []
        n = len(self.urls)
        for attempt in range(n):
            index = (self._current + attempt) % n
            url = self.urls[index]
            started = self.reactor.seconds()
            try:
                answer = yield self._post(url + path, body)
            except EtcdUnavailable as e:
                self.stats.record(op, self.reactor.seconds() - started, True)
                failures.append(str(e))
                continue
            except EtcdError:
                self.stats.record(op, self.reactor.seconds() - started, True)
                self._current = index
                raise
            self.stats.record(op, self.reactor.seconds() - started, False)
            if index != self._current:  # failed over: a watch on the URL that failed may be dead silently
                self._current = index
                for watch in list(self._watches):
                    if watch.url not in (None, url):
                        watch.restart()
            return answer
        raise EtcdUnavailable(
            f"etcd {op} failed at every URL ({'; '.join(failures)}); check that etcd runs and "
            "that --fleet-etcd names its client URLs",
            url=self.describe(),
        )

    @defer.inlineCallbacks
    def _post(self, url: str, body: dict[str, Any]) -> Any:
        if self.closed:
            raise EtcdUnavailable(f"{url}: the etcd client is closed", url=url)
        d = self._http.post(url, json=body)
        d.addTimeout(self.timeout, self.reactor)
        done: defer.Deferred[None] = defer.Deferred()
        self._inflight.add(done)
        try:
            response = yield d
            text_d = treq.content(response)
            text_d.addTimeout(self.timeout, self.reactor)
            text = yield text_d
        except defer.TimeoutError:
            raise EtcdUnavailable(f"{url}: no answer within {self.timeout:g} s", url=url) from None
        except (error.ConnectError, error.ConnectionLost, error.ConnectionDone, OSError) as e:
            raise EtcdUnavailable(f"{url}: {e.__class__.__name__}: {e}", url=url) from None
        except Exception as e:  # the web client's ResponseNeverReceived, RequestTransmissionFailed, ...
            raise EtcdUnavailable(f"{url}: {e.__class__.__name__}: {e}", url=url) from None
        finally:
            self._inflight.discard(done)
            done.callback(None)
        try:
            answer = json.loads(text)
        except ValueError:
            raise EtcdUnavailable(f"{url}: answered HTTP {response.code} with no JSON: {text[:200]!r}", url=url) from None
        if response.code >= 500:
            raise EtcdUnavailable(f"{url}: HTTP {response.code}: {answer.get('message', text[:200])}", url=url)
        if response.code >= 400 or "error" in answer:
            message = answer.get("message") or answer.get("error") or text[:200]
            raise EtcdError(f"{url}: {message}", url=url, code=answer.get("code"))
        return answer

    # ------------------------------------------------------------ key-value

    @defer.inlineCallbacks
    def range(self, key: str, prefix: bool = False) -> Any:
        """The keys at `key` (every key under it with `prefix`), and the store's revision."""
        body: dict[str, Any] = {"key": b64(key)}
        if prefix:
            body["range_end"] = prefix_end(key)
        answer = yield self.call("range", "/v3/kv/range", body)
        kvs = [KeyValue.parse(kv) for kv in answer.get("kvs", [])]
        return kvs, int(answer.get("header", {}).get("revision", 0))

    @defer.inlineCallbacks
    def get(self, key: str) -> Any:
        """The key's KeyValue, or None."""
        kvs, _ = yield self.range(key)
        return kvs[0] if kvs else None

    def put(self, key: str, value: bytes, lease: int = 0) -> defer.Deferred[Any]:
        body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        return self.call("put", "/v3/kv/put", body)

    @defer.inlineCallbacks
    def delete(self, key: str, prefix: bool = False) -> Any:
        """Delete `key` (or every key under it); how many were deleted."""
        body: dict[str, Any] = {"key": b64(key)}
        if prefix:
            body["range_end"] = prefix_end(key)
        answer = yield self.call("delete", "/v3/kv/deleterange", body)
        return int(answer.get("deleted", 0))

    @defer.inlineCallbacks
    def txn(
        self, compare: Iterable[dict[str, Any]], success: Iterable[dict[str, Any]],
        failure: Iterable[dict[str, Any]] = (),
    ) -> Any:
        """One transaction: (succeeded, the responses of the branch taken,
        the store's revision after it: a put's mod_revision)."""
        answer = yield self.call(
            "txn", "/v3/kv/txn", {"compare": list(compare), "success": list(success), "failure": list(failure)},
        )
        revision = int(answer.get("header", {}).get("revision", 0))
        return bool(answer.get("succeeded", False)), answer.get("responses", []), revision

    # ------------------------------------------------------------ leases

    @defer.inlineCallbacks
    def grant(self, ttl: int) -> Any:
        """A new lease of `ttl` seconds: its id."""
        answer = yield self.call("lease_grant", "/v3/lease/grant", {"TTL": str(ttl)})
        return int(answer["ID"])

    @defer.inlineCallbacks
    def keepalive(self, lease: int) -> Any:
        """Renew `lease`: its TTL now, 0 if etcd no longer has it (expired or revoked)."""
        answer = yield self.call("lease_keepalive", "/v3/lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", {}).get("TTL", 0))

    @defer.inlineCallbacks
    def revoke(self, lease: int) -> Any:
        """Revoke `lease` (its keys go at once); False if etcd did not have it."""
        try:
            yield self.call("lease_revoke", "/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as e:
            if e.code == 5 and not isinstance(e, EtcdUnavailable):
                return False
            raise
        return True

    # ------------------------------------------------------------ watch

    def watch(
        self, prefix: str, on_snapshot: Callable[[list[KeyValue], int], None],
        on_events: Callable[[list[WatchEvent], int], None],
    ) -> Watch:
        """Follow every key under `prefix`: `on_snapshot(kvs, revision)`
        first (and again after etcd compacted away revisions the watch
        missed), then `on_events(events, revision)` per change. A dropped
        stream is resumed from the revision after the last one seen."""
        watch = Watch(self, prefix, on_snapshot, on_events)
        self._watches.add(watch)
        watch.start()
        return watch

    def close(self) -> defer.Deferred[None]:
        """Stop every watch; once the calls under way have ended (each has
        its timeout), close the connections."""
        self.closed = True
        for watch in list(self._watches):
            watch.stop()
        under_way = defer.DeferredList(list(self._inflight), consumeErrors=True)
        return under_way.addCallback(lambda _: self._pool.closeCachedConnections())


class _LineReader(Protocol):
    """Reads a watch response body: one JSON object per line."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.buffer = b""
        self.done: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line.strip():
                self.watch.line(line)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.buffer.strip():
            self.watch.line(self.buffer)
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)


class Watch:
    """One resuming watch of a prefix (made by EtcdClient.watch)."""

    log = Logger()

    def __init__(
        self, client: EtcdClient, prefix: str, on_snapshot: Callable[[list[KeyValue], int], None],
        on_events: Callable[[list[WatchEvent], int], None],
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.on_snapshot = on_snapshot
        self.on_events = on_events
        self.revision = 0  # the last revision delivered
        self.stopped = False
        self.connected = False
        self.reconnects = 0
        self._response: Any = None
        self._retry: IDelayedCall | None = None
        self._delay = WATCH_RETRY[0]
        self._need_snapshot = True
        self.last_line_at = 0.0
        self.url: str | None = None  # the URL its stream is on

    def start(self) -> None:
        self._run()

    def restart(self) -> None:
        """Drop the stream now and resume (e.g. after etcd was unreachable:
        the stream may be dead without a FIN)."""
        if self.stopped:
            return
        if self._response is not None:
            self._abort(None)
        elif self._retry is not None and self._retry.active():
            self._retry.cancel()
            self._run()

    def _abort(self, _: Any) -> None:
        response, self._response = self._response, None
        if response is not None:
            deliver = getattr(response, "original", response)
            transport = getattr(deliver, "_transport", None)
            if transport is not None:
                transport.stopProducing()

    def stop(self) -> None:
        self.stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._abort(None)
        self.client._watches.discard(self)

    @defer.inlineCallbacks
    def _run(self) -> Any:
        self._retry = None
        client = self.client
        try:
            if self._need_snapshot:
                kvs, revision = yield client.range(self.prefix, prefix=True)
                if self.stopped:
                    return
                self._need_snapshot = False
                self.revision = revision
                self.on_snapshot(kvs, revision)
            yield self._stream()
        except Exception as e:
            if self.stopped:
                return
            self.connected = False
            self.reconnects += 1
            delay = self._delay
            self._delay = min(self._delay * 2, WATCH_RETRY[1])
            self.log.info(
                "etcd watch of {prefix} interrupted ({why}); resuming from revision {rev} in {delay:.1f} s",
                prefix=self.prefix, why=str(e) or e.__class__.__name__, rev=self.revision + 1, delay=delay,
                event="fleet_watch_interrupted",
            )
            self._retry = client.reactor.callLater(delay, self._run)
            return
        if not self.stopped:  # the stream ended cleanly (etcd restarted): resume at once
            self.connected = False
            self.reconnects += 1
            self._retry = client.reactor.callLater(WATCH_RETRY[0], self._run)

    @defer.inlineCallbacks
    def _stream(self) -> Any:
        client = self.client
        url = client.urls[client._current]
        body = {"create_request": {
            "key": b64(self.prefix), "range_end": prefix_end(self.prefix),
            "start_revision": str(self.revision + 1), "progress_notify": True,
        }}
        started = client.reactor.seconds()
        d = client._http.post(url + "/v3/watch", json=body, unbuffered=True)
        d.addTimeout(client.timeout, client.reactor)
        try:
            response = yield d
        except Exception as e:
            client.stats.record("watch", client.reactor.seconds() - started, True)
            client._current = (client._current + 1) % len(client.urls)  # try the next URL next time
            raise EtcdUnavailable(f"{url}: {e.__class__.__name__}: {e}", url=url) from None
        client.stats.record("watch", client.reactor.seconds() - started, False)
        if response.code != 200:
            text = yield treq.content(response)
            raise EtcdUnavailable(f"{url}: watch answered HTTP {response.code}: {text[:200]!r}", url=url)
        self._response = response
        self.url = url
        self.connected = True
        self._delay = WATCH_RETRY[0]
        reader = _LineReader(self)
        response.deliverBody(reader)
        try:
            yield reader.done
        finally:
            self._response = None
            self.connected = False

    def line(self, raw: bytes) -> None:
        """One WatchResponse of the stream."""
        self.last_line_at = time.monotonic()
        try:
            answer = json.loads(raw)
        except ValueError:
            self.log.warn("etcd watch sent a line that is not JSON: {line!r}", line=raw[:200], event="fleet_watch_bad")
            return
        if "error" in answer:
            self.log.warn("etcd watch error: {why}", why=answer["error"], event="fleet_watch_error")
            return
        result = answer.get("result", {})
        if int(result.get("compact_revision", 0) or 0) > 0 or result.get("canceled"):
            # the revisions we missed are gone: read everything again
            self._need_snapshot = True
            self._abort(None)
            return
        events = []
        for event in result.get("events", []):
            kv = KeyValue.parse(event.get("kv", {}))
            events.append(WatchEvent(kv, event.get("type") == "DELETE"))
        revision = int(result.get("header", {}).get("revision", 0))
        if events:
            self.revision = max(self.revision, *(e.kv.mod_revision for e in events))
            self.on_events(events, self.revision)
        elif revision and not result.get("created"):  # a progress notification
            self.revision = max(self.revision, revision)
