"""Certificates from an ACME server (Let's Encrypt), for the hostnames clients claim.

`AcmeCertificates` is a certificate source of the `--https` edge. It has the
four methods of `rtunnel.server.certificates.CertificateSource`:

    class CertificateSource(Protocol):
        def context_for(self, hostname: str) -> OpenSSL.SSL.Context | None:
            '''The TLS context serving `hostname` (SNI, normalised), or None: no
            certificate for it (the handshake then fails with an
            unrecognized_name alert -- never another tenant's certificate).'''
        def challenge_response(self, token: str) -> bytes | None:
            '''The HTTP-01 key authorization for
            /.well-known/acme-challenge/<token>, if one is pending.'''
        def name_claimed(self, hostname: str) -> None:
            '''A connected, authorised client claimed `hostname`: a source
            that obtains certificates may start doing so now.'''
        def name_released(self, hostname: str) -> None: ...

Guarantees (docs/http.md "ACME"): a certificate is ordered only for a
claimed name, one order per name at a time, at most `max_concurrent` at
once and `orders_per_hour` an hour, failures back off; the `acme` library's
blocking calls run in this source's own thread pool, never on the reactor
thread, and its exceptions never leave this module (each becomes an
`AcmeError` whose message says what was wrong and what to do); files are
written 0600 and atomically; the old certificate serves until a new one is
stored.
"""

from __future__ import annotations

import datetime
import json
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import idna
import josepy
import requests
from acme import challenges, client, crypto_util, messages
from acme import errors as acme_errors
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID
from OpenSSL import SSL, crypto
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from rtunnel.config import LETS_ENCRYPT
from rtunnel.errors import RtunnelError, StateDirError
from rtunnel.files import write_private
from rtunnel.server.certificates import offer_http11
from rtunnel.tls import private_key_pem, same_public_key

RENEW_BEFORE = 30 * 86400.0  # renew when this much validity remains (or a third of the lifetime)
HOUR = 3600.0
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_PEM_KEY = re.compile(rb"-----BEGIN PRIVATE KEY-----.+?-----END PRIVATE KEY-----\s*", re.S)


class AcmeError(RtunnelError):
    """An order failed; the message says what was wrong and what to do."""


def normalise_hostname(hostname: str) -> str | None:
    """The name as every comparison and file name uses it: lower case, IDNA
    (A-labels), no trailing dot; None if it is not a DNS name (a `*.` label
    is kept: the caller decides what a wildcard may do)."""
    name = hostname.strip().rstrip(".").lower()
    wildcard = name.startswith("*.")
    if wildcard:
        name = name[2:]
    try:
        name = idna.encode(name, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return None
    if len(name) > 253 or "." not in name or not all(_LABEL.match(label) for label in name.split(".")):
        return None
    return "*." + name if wildcard else name


@dataclass(frozen=True)
class NameCertificate:
    """One name's key and chain, as stored and as served."""

    name: str
    pem: bytes  # the file: private key, then the chain (leaf first)
    not_before: float
    not_after: float
    serial: int
    context: SSL.Context

    def due(self, now: float, renew_before: float) -> bool:
        """Renew when less than min(renew_before, a third of the lifetime) remains."""
        lifetime = self.not_after - self.not_before
        return self.not_after - now < min(renew_before, lifetime / 3)


def load_name_certificate(name: str, pem: bytes) -> NameCertificate:
    """Parse and check a stored (or just issued) key + chain; ValueError says what is wrong."""
    match = _PEM_KEY.search(pem)
    if match is None:
        raise ValueError("no private key in the file")
    key = serialization.load_pem_private_key(match.group(0), password=None)
    chain = x509.load_pem_x509_certificates(pem[: match.start()] + pem[match.end():])
    leaf = chain[0]
    if not same_public_key(leaf.public_key(), key.public_key()):
        raise ValueError("the private key does not belong to the certificate")
    try:
        names = leaf.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        dns_names = names.get_values_for_type(x509.DNSName)  # type: ignore[attr-defined]
    except x509.ExtensionNotFound:
        dns_names = []
    if name not in dns_names:
        raise ValueError(f"the certificate is for {', '.join(dns_names) or 'no DNS name'}, not {name}")
    options = CertificateOptions(
        privateKey=crypto.load_privatekey(crypto.FILETYPE_PEM, match.group(0)),
        certificate=crypto.X509.from_cryptography(leaf),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
    context = options.getContext()
    offer_http11(context)
    return NameCertificate(
        name, pem, leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp(),
        leaf.serial_number, context,
    )


_SSL_REASON = re.compile(r"\[SSL: [A-Z_]+\] ([^(']+?)\s*\(")
_OS_REASON = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")


def _network_reason(error: requests.exceptions.RequestException) -> str:
    """The cause in requests' long message ("certificate verify failed: ...", "Connection refused")."""
    text = str(error)
    match = _SSL_REASON.search(text) or _OS_REASON.search(text)
    return match.group(1).strip() if match else text


def _describe(error: BaseException) -> str:
    """The ACME server's own words for an error, without a traceback."""
    if isinstance(error, messages.Error):
        return error.detail or error.title or error.typ
    if isinstance(error, acme_errors.IssuanceError):
        return _describe(error.error)
    if isinstance(error, acme_errors.ValidationError):
        details = [
            str(ch.error.detail or ch.error.typ)
            for authzr in error.failed_authzrs for ch in authzr.body.challenges if ch.error is not None
        ]
        return "; ".join(details) or "the authorization is invalid"
    return str(error) or type(error).__name__


class _Job:
    """One order's blocking work, run in a pool thread. It touches the
    source only through the thread-safe `_Shared` it is given."""

    def __init__(self, shared: _Shared, name: str) -> None:
        self.shared = shared
        self.name = name
        self.url = shared.directory_url

    def run(self) -> NameCertificate:
        """Order, validate, finalize; the new certificate, already stored."""
        try:
            return self._run()
        except AcmeError:
            raise
        except StateDirError as e:
            raise AcmeError(str(e)) from None
        except requests.exceptions.SSLError as e:
            raise AcmeError(
                f"the ACME server at {self.url} has a TLS certificate this host does not trust ({_network_reason(e)}); "
                "for a "
                "private ACME server give its CA with --acme-ca"
            ) from None
        except requests.exceptions.RequestException as e:
            raise AcmeError(
                f"cannot reach the ACME server at {self.url}: {_network_reason(e)}; check --acme-directory and this "
                "host's network"
            ) from None
        except acme_errors.ValidationError as e:
            raise AcmeError(
                f"ACME server at {self.url} could not validate {self.name} over HTTP-01: {_describe(e)}; check "
                f"that {self.name} resolves to this server and that port 80 (--http) reaches it"
            ) from None
        except (messages.Error, acme_errors.Error, josepy.errors.Error) as e:
            raise AcmeError(
                f"ACME server at {self.url} refused the order for {self.name}: {_describe(e)}; check "
                f"--acme-directory / DNS for {self.name}"
            ) from None

    def _run(self) -> NameCertificate:
        shared = self.shared
        deadline = time.monotonic() + shared.order_timeout
        acme, jwk = shared.acme_client()
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = private_key_pem(key)
        csr = crypto_util.make_csr(key_pem, [self.name])
        try:
            order = acme.new_order(csr)
        except messages.Error as e:
            if e.code != "accountDoesNotExist":
                raise
            acme, jwk = shared.acme_client(register=True)  # the server forgot the account: register the key again
            order = acme.new_order(csr)
        tokens = []
        try:
            for authzr in order.authorizations:
                if authzr.body.status == messages.STATUS_VALID:
                    continue  # the server reused a valid authorization
                challb = next(
                    (c for c in authzr.body.challenges if isinstance(c.chall, challenges.HTTP01)), None
                )
                if challb is None:
                    raise AcmeError(
                        f"ACME server at {self.url} offers no HTTP-01 challenge for {self.name}; use a server "
                        "that does, or give a certificate with --https-cert"
                    )
                response, validation = challb.chall.response_and_validation(jwk)
                token = challb.chall.encode("token")
                shared.add_challenge(token, validation.encode())
                tokens.append(token)
                acme.answer_challenge(challb, response)
            self._await_authorizations(acme, order, deadline)
        finally:
            for token in tokens:
                shared.remove_challenge(token)
        order = self._finalize(acme, order, deadline)
        pem = key_pem + order.fullchain_pem.encode()
        try:
            certificate = load_name_certificate(self.name, pem)
        except ValueError as e:
            raise AcmeError(
                f"ACME server at {self.url} issued an unusable certificate for {self.name}: {e}; check "
                "--acme-directory (is it the ACME server you meant?)"
            ) from None
        write_private(shared.certificate_path(self.name), pem)
        return certificate

    def _check(self, deadline: float) -> None:
        if self.shared.stopping.is_set():
            raise AcmeError(f"the order for {self.name} was abandoned: the server is stopping")
        if time.monotonic() > deadline:
            raise AcmeError(
                f"ACME server at {self.url} did not finish the order for {self.name} within "
                f"{self.shared.order_timeout:g} s; it is tried again later"
            )

    def _await_authorizations(self, acme: client.ClientV2, order: messages.OrderResource, deadline: float) -> None:
        pending = list(order.authorizations)
        while pending:
            self._check(deadline)
            time.sleep(self.shared.poll_interval)
            still = []
            for authzr in pending:
                authzr, _ = acme.poll(authzr)
                if authzr.body.status == messages.STATUS_VALID:
                    continue
                if authzr.body.status in (messages.STATUS_PENDING, messages.STATUS_PROCESSING):
                    still.append(authzr)
                else:
                    raise acme_errors.ValidationError([authzr])
            pending = still

    def _finalize(
        self, acme: client.ClientV2, order: messages.OrderResource, deadline: float
    ) -> messages.OrderResource:
        try:
            acme.begin_finalization(order)
        except messages.Error as e:
            if e.code != "orderNotReady":
                raise
        while True:
            self._check(deadline)
            try:  # the library sleeps 1 s between polls; a short deadline lets us see `stopping`
                return acme.poll_finalization(order, datetime.datetime.now() + datetime.timedelta(seconds=3))
            except acme_errors.TimeoutError:
                continue


class _Shared:
    """What the pool threads share with the reactor thread: the pending
    HTTP-01 tokens and the account, each behind a lock."""

    def __init__(
        self, directory: Path, directory_url: str, email: str | None, ca_file: Path | None,
        order_timeout: float, poll_interval: float, network_timeout: float,
    ) -> None:
        self.directory = directory
        self.directory_url = directory_url
        self.email = email
        self.verify: bool | str = str(ca_file) if ca_file is not None else True
        self.order_timeout = order_timeout
        self.poll_interval = poll_interval
        self.network_timeout = network_timeout
        self.stopping = threading.Event()
        self.registered = 0  # accounts registered by this process (tests read it)
        self._challenges: dict[str, bytes] = {}
        self._challenge_lock = threading.Lock()
        self._account_lock = threading.Lock()
        self._jwk: josepy.JWKRSA | None = None
        self._account: messages.RegistrationResource | None = None

    def certificate_path(self, name: str) -> Path:
        return self.directory / "certificates" / f"{name}.pem"

    def add_challenge(self, token: str, key_authorization: bytes) -> None:
        with self._challenge_lock:
            self._challenges[token] = key_authorization

    def remove_challenge(self, token: str) -> None:
        with self._challenge_lock:
            self._challenges.pop(token, None)

    def challenge(self, token: str) -> bytes | None:
        with self._challenge_lock:
            return self._challenges.get(token)

    def acme_client(self, register: bool = False) -> tuple[client.ClientV2, josepy.JWKRSA]:
        """A client of its own for one order (a ClientNetwork's nonces are not
        thread-safe), signed with the account, registered once per directory."""
        with self._account_lock:
            jwk = self._account_key()
            net = client.ClientNetwork(
                jwk, verify_ssl=self.verify, user_agent="rtunnel", timeout=int(self.network_timeout)  # type: ignore[arg-type]
            )
            directory = client.ClientV2.get_directory(self.directory_url, net)
            acme = client.ClientV2(directory, net)
            if self._account is None and not register:
                self._account = self._stored_account()
            if self._account is None or register:
                self._account = self._register(acme)
            net.account = self._account
            return acme, jwk

    def _account_key(self) -> josepy.JWKRSA:
        if self._jwk is None:
            path = self.directory / "account-key.pem"
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except FileNotFoundError:
                key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
                write_private(path, private_key_pem(key))
            except (OSError, ValueError) as e:
                raise AcmeError(
                    f"cannot read the ACME account key {path}: {e}; fix or remove it (a new account is then "
                    "registered)"
                ) from None
            if not isinstance(key, rsa.RSAPrivateKey):
                raise AcmeError(f"the ACME account key {path} is not an RSA key; remove it (a new one is made)")
            self._jwk = josepy.JWKRSA(key=key)
        return self._jwk

    def _stored_account(self) -> messages.RegistrationResource | None:
        try:
            stored = json.loads((self.directory / "account.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(stored, dict) or stored.get("directory") != self.directory_url or not stored.get("uri"):
            return None
        return messages.RegistrationResource(uri=stored["uri"], body=messages.Registration())

    def _register(self, acme: client.ClientV2) -> messages.RegistrationResource:
        new = messages.NewRegistration.from_data(email=self.email, terms_of_service_agreed=True)
        try:
            account = acme.new_account(new)
        except acme_errors.ConflictError as e:  # this key has an account already
            account = messages.RegistrationResource(uri=e.location, body=messages.Registration())
        self.registered += 1
        record = {"directory": self.directory_url, "uri": account.uri}
        write_private(self.directory / "account.json", (json.dumps(record) + "\n").encode())
        AcmeCertificates.log.info(
            "ACME account {account} registered with {directory}", account=account.uri,
            directory=self.directory_url, event="acme_account_registered",
        )
        return account


class AcmeCertificates(service.Service):
    """The certificate source that orders and renews certificates over
    ACME (HTTP-01). Start it (it is a Service) before use: starting loads
    the stored certificates and schedules the renewal check."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        state_dir: Path,
        directory_url: str = LETS_ENCRYPT,
        email: str | None = None,
        ca_file: Path | None = None,
        *,
        clock: IReactorTime | None = None,
        orders_per_hour: int = 30,
        max_concurrent: int = 2,
        check_interval: float = HOUR,
        renew_before: float = RENEW_BEFORE,
        backoff: tuple[float, float] = (300.0, 86400.0),
        order_timeout: float = 90.0,
        poll_interval: float = 0.5,
        network_timeout: float = 15.0,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.directory_url = directory_url
        self.orders_per_hour = orders_per_hour
        self.max_concurrent = max_concurrent
        self.check_interval = check_interval
        self.renew_before = renew_before
        self.backoff = backoff
        self._shared = _Shared(
            Path(state_dir) / "acme", directory_url, email, ca_file, order_timeout, poll_interval, network_timeout
        )
        self._pool = ThreadPool(minthreads=0, maxthreads=max_concurrent, name="rtunnel-acme")
        self._certificates: dict[str, NameCertificate] = {}
        self._claimed: Counter[str] = Counter()
        self._wanted: dict[str, None] = {}  # names waiting for an order, oldest first
        self._running: dict[str, defer.Deferred[Any]] = {}
        self._started: deque[float] = deque()  # start times of the orders of the last hour
        self._failures: dict[str, tuple[int, float]] = {}  # name -> (failures in a row, next attempt)
        self._failing: set[str] = set()
        self._rate_logged = False
        self._wake: IDelayedCall | None = None
        self._check_call: IDelayedCall | None = None
        self.orders = Counter({"ok": 0, "failed": 0})

    # ------------------------------------------------------------ the service

    def startService(self) -> None:
        super().startService()
        self._shared.stopping.clear()
        self._pool.start()
        self._load()
        for name in list(self._claimed):
            self._consider(name)
        self._check_call = self.clock.callLater(self.check_interval, self._check)

    def stopService(self) -> defer.Deferred[None]:
        """Cancel the timers; an order in flight is abandoned at its next poll
        (its thread ends within one network timeout)."""
        super().stopService()
        self._shared.stopping.set()
        for call in (self._wake, self._check_call):
            if call is not None and call.active():
                call.cancel()
        self._wake = self._check_call = None
        self._wanted.clear()
        running = list(self._running.values())
        done = defer.DeferredList(running, consumeErrors=True)
        done.addCallback(lambda _: self._pool.stop())
        return done  # type: ignore[return-value]

    def _load(self) -> None:
        directory = self._shared.directory / "certificates"
        if not directory.is_dir():
            return
        for path in sorted(directory.glob("*.pem")):
            name = path.name[: -len(".pem")]
            try:
                if normalise_hostname(name) != name:
                    raise ValueError("the file name is not a normalised hostname")
                self._certificates[name] = load_name_certificate(name, path.read_bytes())
            except (OSError, ValueError) as e:
                self.log.warn(
                    "ignoring the stored certificate {path}: {reason}; it is ordered again when its name is claimed",
                    path=str(path), reason=str(e), event="acme_certificate_unreadable",
                )
        if self._certificates:
            self.log.info(
                "loaded {n} ACME certificates from {directory}", n=len(self._certificates),
                directory=str(directory), names=sorted(self._certificates), event="acme_certificates_loaded",
            )

    # ------------------------------------------------ the CertificateSource

    def context_for(self, hostname: str) -> SSL.Context | None:
        name = normalise_hostname(hostname)
        certificate = self._certificates.get(name) if name else None
        return certificate.context if certificate else None

    def challenge_response(self, token: str) -> bytes | None:
        return self._shared.challenge(token)

    def name_claimed(self, hostname: str) -> None:
        name = normalise_hostname(hostname)
        if name is None or name.startswith("*."):
            self.log.info(
                "no ACME certificate for {hostname}: {reason}", hostname=hostname,
                reason="a wildcard cannot be validated over HTTP-01; use --https-cert"
                if name else "not a DNS name", event="acme_name_refused",
            )
            return
        self._claimed[name] += 1
        self._consider(name)

    def name_released(self, hostname: str) -> None:
        name = normalise_hostname(hostname)
        if name is None or self._claimed[name] == 0:
            return
        self._claimed[name] -= 1
        if self._claimed[name] == 0:
            del self._claimed[name]
            self._wanted.pop(name, None)

    # ----------------------------------------------------- what tests read

    def certificate_pem(self, hostname: str) -> bytes | None:
        """The stored key + chain of `hostname` (tests, the admin page)."""
        certificate = self._certificates.get(normalise_hostname(hostname) or "")
        return certificate.pem if certificate else None

    def idle(self) -> defer.Deferred[None]:
        """Fires when no order is running (one that waits for the rate limit
        or a back-off is not running)."""
        running = list(self._running.values())
        if not running:
            return defer.succeed(None)
        return defer.DeferredList(running, consumeErrors=True).addCallback(lambda _: self.idle())

    @property
    def accounts_registered(self) -> int:
        return self._shared.registered

    # ------------------------------------------------------------- orders

    def _consider(self, name: str) -> None:
        if name in self._running or name in self._wanted or not self.running:
            return
        certificate = self._certificates.get(name)
        if certificate is not None and not certificate.due(self.clock.seconds(), self.renew_before):
            return
        self._wanted[name] = None
        self._pump()

    def _pump(self) -> None:
        """Start what the bounds allow; wake up when the next one may start."""
        now = self.clock.seconds()
        while self._started and self._started[0] <= now - HOUR:
            self._started.popleft()
        wake_at: float | None = None
        for name in list(self._wanted):
            if name not in self._claimed:
                del self._wanted[name]
                continue
            _, next_attempt = self._failures.get(name, (0, 0.0))
            if next_attempt > now:
                wake_at = min(wake_at or next_attempt, next_attempt)
                continue
            if len(self._running) >= self.max_concurrent:
                break  # an order's end pumps again
            if len(self._started) >= self.orders_per_hour:
                free_at = self._started[0] + HOUR
                wake_at = min(wake_at or free_at, free_at)
                if not self._rate_logged:
                    self._rate_logged = True
                    self.log.warn(
                        "ACME order for {hostname} waits {retry_in:.0f} s: {limit} orders were started in the "
                        "last hour (the limit)", hostname=name, retry_in=free_at - now, limit=self.orders_per_hour,
                        event="acme_rate_limited",
                    )
                break
            del self._wanted[name]
            self._start(name, now)
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._wake = None
        if wake_at is not None:
            self._wake = self.clock.callLater(max(0.0, wake_at - now), self._pump)

    def _start(self, name: str, now: float) -> None:
        self._started.append(now)
        self._rate_logged = False
        renewal = name in self._certificates
        self.log.info(
            "ordering a certificate for {hostname} from {directory}", hostname=name, renewal=renewal,
            directory=self.directory_url, event="acme_order_started",
        )
        d: defer.Deferred[Any] = deferToThreadPool(self.reactor, self._pool, _Job(self._shared, name).run)
        d.addCallbacks(self._issued, self._failed, callbackArgs=(name,), errbackArgs=(name,))
        d.addBoth(self._ended, name)
        self._running[name] = d

    def _issued(self, certificate: NameCertificate, name: str) -> None:
        self._certificates[name] = certificate
        self._failures.pop(name, None)
        self._failing.discard(name)
        self.orders["ok"] += 1
        self.log.info(
            "certificate for {hostname} issued, valid until {not_after}", hostname=name,
            not_after=datetime.datetime.fromtimestamp(certificate.not_after, datetime.UTC).isoformat(),
            serial=f"{certificate.serial:x}", event="acme_certificate_issued",
        )

    def _failed(self, failure: Failure, name: str) -> None:
        failures = self._failures.get(name, (0, 0.0))[0] + 1
        first, most = self.backoff
        delay = min(first * 2 ** (failures - 1), most)
        self._failures[name] = (failures, self.clock.seconds() + delay)
        self.orders["failed"] += 1
        serving = name in self._certificates
        if serving:
            self._failing.add(name)
        if failure.check(AcmeError):
            self.log.warn(
                "certificate order for {hostname} failed: {reason}; next attempt in {retry_in:.0f} s{serving}",
                hostname=name, reason=failure.getErrorMessage(), retry_in=delay,
                serving=" (the current certificate keeps serving)" if serving else "",
                event="acme_order_failed",
            )
        else:
            self.log.failure(
                "certificate order for {hostname} failed unexpectedly (a bug); next attempt in {retry_in:.0f} s",
                failure, hostname=name, retry_in=delay, event="acme_order_failed",
            )

    def _ended(self, _: object, name: str) -> None:
        del self._running[name]
        if self.running:
            self._pump()
            if name in self._failures:  # retried after its back-off if still claimed
                self._consider(name)

    def _check(self) -> None:
        """The periodic renewal check of the claimed names."""
        self._check_call = self.clock.callLater(self.check_interval, self._check)
        for name in list(self._claimed):
            self._consider(name)

    # ------------------------------------------------------------ metrics

    def collect(self) -> Iterator[Metric]:
        """Prometheus families (register the source in a CollectorRegistry)."""
        expiry = GaugeMetricFamily(
            "rtunnel_certificate_expiry_timestamp_seconds",
            "When the certificate served for a hostname expires (its notAfter, Unix time).", labels=["hostname"],
        )
        failing = GaugeMetricFamily(
            "rtunnel_certificate_renewal_failing",
            "1 while the last order for a hostname that has a certificate failed (the old one serves).",
            labels=["hostname"],
        )
        for name, certificate in sorted(self._certificates.items()):
            expiry.add_metric([name], certificate.not_after)
            failing.add_metric([name], 1.0 if name in self._failing else 0.0)
        orders = CounterMetricFamily("rtunnel_acme_orders", "ACME certificate orders finished.", labels=["result"])
        for result in ("ok", "failed"):
            orders.add_metric([result], self.orders[result])
        yield from (expiry, failing, orders)


__all__ = ["LETS_ENCRYPT", "AcmeCertificates", "AcmeError", "normalise_hostname"]
