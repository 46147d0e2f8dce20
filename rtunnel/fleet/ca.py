"""Member certificates: a fleet CA in the state directory, the certificates
it issues to members, and the TLS settings of member links.

A member link is mutual TLS: each end presents a member certificate signed
by the fleet's CA and trusts no other CA. A member certificate names its
member twice: the subject's common name and a DNS name in its
subjectAltName (the one that counts, `member_name_of`); a peer checks that
name against the member it dialled (outgoing) or against the directory
(incoming), so a member cannot pose as another (docs/fleet.md "Member
certificates").
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto
from twisted.internet import ssl

from rtunnel.errors import ConfigError
from rtunnel.files import write_private
from rtunnel.tls import MIN_TLS, private_key_pem, read_file, same_public_key

CA_CERT = "fleet-ca.crt"  # in the state directory, mode 0644
CA_KEY = "fleet-ca.key"  # in the state directory, mode 0600
CA_DAYS = 3650
MEMBER_DAYS = 825
ORGANIZATION = "rtunnel fleet"

#: A member's name: a DNS label (it is a DNS name in the certificate and a
#: part of etcd keys).
MEMBER_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def check_member_name(name: str, what: str = "member name") -> str:
    """`name` if it is a valid member name, else ConfigError saying why."""
    if not MEMBER_NAME.fullmatch(name):
        raise ConfigError(
            f"{what} {name[:80]!r} is not valid: use 1-63 lower-case letters, digits and '-', "
            "not starting or ending with '-' (e.g. m1, edge-fra-2)"
        )
    return name


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_public(path: Path, data: bytes) -> None:
    """A certificate: written like a key (atomic), then made readable."""
    write_private(path, data)
    path.chmod(0o644)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# ---------------------------------------------------------------- the CA


@dataclass(frozen=True)
class FleetCA:
    """The fleet CA's certificate and key, as read from the state directory."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path


def init_ca(state_dir: Path, fleet: str = "fleet") -> tuple[Path, bool]:
    """Make the fleet CA in `state_dir` unless one is there: (its certificate
    path, created). An existing CA is never replaced: every member
    certificate it issued would stop working."""
    cert_path, key_path = state_dir / CA_CERT, state_dir / CA_KEY
    if cert_path.exists() or key_path.exists():
        load_ca(state_dir)  # a half-made or broken CA is reported, not kept silently
        return cert_path, False
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, f"rtunnel fleet CA {fleet}"),
    ])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, private_key_pem(key))  # the key first: a certificate alone is never left
    _write_public(cert_path, _pem(cert))
    return cert_path, True


def load_ca(state_dir: Path) -> FleetCA:
    """The fleet CA of `state_dir` (ConfigError says what is missing or wrong)."""
    cert_path, key_path = state_dir / CA_CERT, state_dir / CA_KEY
    if not cert_path.exists() and not key_path.exists():
        raise ConfigError(
            f"there is no fleet CA in {state_dir}: run 'rtunnel_server fleet-init --state-dir {state_dir}' "
            "first (once, on one machine), or pass the state directory that holds it"
        )
    cert_pem = read_file(cert_path, "fleet CA certificate")
    key_pem = read_file(key_path, "fleet CA key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{cert_path} / {key_path} is not a PEM certificate and key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not same_public_key(cert.public_key(), key.public_key()):
        raise ConfigError(f"the fleet CA key {key_path} does not belong to {cert_path}; restore the pair")
    return FleetCA(cert, key, cert_path)


@dataclass(frozen=True)
class MemberFiles:
    """Where fleet-add-member wrote a member's files."""

    cert: Path
    key: Path
    ca: Path


def issue_member(state_dir: Path, member: str, out_dir: Path | None = None) -> MemberFiles:
    """A new key and certificate for `member`, signed by the fleet CA of
    `state_dir`, written to `out_dir` (default: the state directory) as
    MEMBER.crt and MEMBER.key (0600), with a copy of the CA certificate."""
    check_member_name(member)
    ca = load_ca(state_dir)
    out = out_dir if out_dir is not None else state_dir
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, member),
        ]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(min(now + datetime.timedelta(days=MEMBER_DAYS), ca.cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(member)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    files = MemberFiles(out / f"{member}.crt", out / f"{member}.key", out / CA_CERT)
    write_private(files.key, private_key_pem(key))
    _write_public(files.cert, _pem(cert))
    if files.ca != ca.cert_path:
        _write_public(files.ca, _pem(ca.cert))
    return files


# ---------------------------------------------------------------- a member's identity


def member_name_of(cert: x509.Certificate) -> str | None:
    """The member a certificate names: its single subjectAltName DNS name
    (None if it has none, or several)."""
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    dns = names.get_values_for_type(x509.DNSName)
    return dns[0] if len(dns) == 1 else None


@dataclass(frozen=True)
class MemberIdentity:
    """This member's certificate and key, and the fleet CA it trusts."""

    member: str
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    def tls_options(self) -> ssl.CertificateOptions:
        """TLS 1.2+ presenting our member certificate and requiring the
        peer's, chained to the fleet CA and to nothing else (both ends)."""
        return ssl.CertificateOptions(
            privateKey=crypto.load_privatekey(crypto.FILETYPE_PEM, self.key_pem),
            certificate=crypto.load_certificate(crypto.FILETYPE_PEM, self.cert_pem),
            verify=True,
            caCerts=[crypto.load_certificate(crypto.FILETYPE_PEM, self.ca_pem)],
            requireCertificate=True,
            raiseMinimumTo=MIN_TLS,
        )


def load_member_identity(cert_path: Path, key_path: Path, ca_path: Path, member: str) -> MemberIdentity:
    """Read and check --fleet-cert/--fleet-key/--fleet-ca for `member`: the
    key belongs to the certificate, the CA signed it, and it names `member`
    (ConfigError says which check failed and what to do)."""
    cert_pem = read_file(cert_path, "member certificate")
    key_pem = read_file(key_path, "member key")
    ca_pem = read_file(ca_path, "fleet CA certificate")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
        key = serialization.load_pem_private_key(key_pem, None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{cert_path}, {key_path} or {ca_path} is not PEM key material: {e}") from None
    if not same_public_key(cert.public_key(), key.public_key()):
        raise ConfigError(f"the member key {key_path} does not belong to the certificate {cert_path}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as e:  # InvalidSignature has no message
        raise ConfigError(
            f"{cert_path} was not issued by the fleet CA {ca_path} ({type(e).__name__}); issue it with "
            "'rtunnel_server fleet-add-member' on the machine that holds the fleet CA"
        ) from None
    named = member_name_of(cert)
    if named != member:
        raise ConfigError(
            f"{cert_path} is the certificate of member {named!r}, not of {member!r}: pass this member's "
            f"own certificate, or issue one with 'rtunnel_server fleet-add-member {member}'"
        )
    if cert.not_valid_after_utc <= _now():
        raise ConfigError(f"the member certificate {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; issue a new one")
    return MemberIdentity(member, cert_pem, key_pem, ca_pem)


def member_identity_in(state_dir: Path, member: str) -> MemberIdentity:
    """This member's identity from the files fleet-add-member wrote into
    `state_dir` (the default when no --fleet-cert is given)."""
    cert = state_dir / f"{member}.crt"
    if not cert.exists():
        raise ConfigError(
            f"member {member} has no certificate in {state_dir} ({cert.name}): issue one with "
            f"'rtunnel_server fleet-add-member {member} --out DIR' where the fleet CA is, and copy "
            f"{member}.crt, {member}.key and {CA_CERT} into {state_dir}, or pass them with "
            "--fleet-cert, --fleet-key and --fleet-ca"
        )
    return load_member_identity(cert, state_dir / f"{member}.key", state_dir / CA_CERT, member)


def member_identity(
    state_dir: Path, member: str, cert: Path | None, key: Path | None, ca_file: Path | None,
) -> MemberIdentity:
    """The member identity the options name: --fleet-cert/--fleet-key/
    --fleet-ca if given (all three), else the files in the state directory."""
    if cert is None or key is None or ca_file is None:
        return member_identity_in(state_dir, member)
    return load_member_identity(cert, key, ca_file, member)
