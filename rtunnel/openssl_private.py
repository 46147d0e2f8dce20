"""Every private pyOpenSSL name rtunnel uses, and nothing else.

pyOpenSSL gives no way to hand a connection's memory buffers back to
malloc: a memory BIO (OpenSSL's `BIO_s_mem`) keeps the largest buffer it
ever held (its `BUF_MEM` grows and never shrinks), so a TLS connection
keeps the size of its ClientHello or server flight (about 3 KB per
connection after the handshake) and, after a burst, the size of its
largest read or flush (hundreds of KB) for as long as it lives, idle or
not. `renew_memory_bios` replaces both BIOs with new, empty ones, as
pyOpenSSL makes them. Nor does pyOpenSSL set a context's key exchange
groups: `set_key_exchange_groups` does (`SSL_CTX_set1_groups_list`, which
cryptography's bindings name by its older name `SSL_CTX_set1_curves_list`).
They use `Connection._ssl`, `_into_ssl` and `_from_ssl`, `Context._context`
and pyOpenSSL's cffi bindings (`OpenSSL._util.lib`);
tests/test_openssl_private.py checks that each name in `PRIVATE_NAMES`
exists on the installed pyOpenSSL.
"""

from __future__ import annotations

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

#: (where, attribute) for every private name used: "Connection" is an
#: `OpenSSL.SSL.Connection` on memory BIOs, "lib" pyOpenSSL's cffi library.
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    ("Connection", "_ssl"),
    ("Connection", "_into_ssl"),
    ("Connection", "_from_ssl"),
    ("Context", "_context"),
    ("lib", "BIO_new"),
    ("lib", "BIO_s_mem"),
    ("lib", "BIO_free"),
    ("lib", "BIO_get_mem_data"),
    ("lib", "SSL_set_bio"),
    ("lib", "SSL_CTX_set1_curves_list"),
    ("lib", "ERR_clear_error"),
)


def _held(bio: object) -> int:
    """Bytes waiting in a memory BIO."""
    return int(_lib.BIO_get_mem_data(bio, _ffi.NULL))


def renew_memory_bios(connection: SSL.Connection) -> bool:
    """Replace `connection`'s two memory BIOs with new, empty ones, which
    frees the buffers the old ones grew. Done only when both hold nothing
    (no ciphertext is lost: a partial record already sits in OpenSSL's own
    record buffer); False, and nothing changed, otherwise or for a
    connection on a socket."""
    into, out = connection._into_ssl, connection._from_ssl
    if into is None or out is None or _held(into) or _held(out):
        return False
    new_into = _lib.BIO_new(_lib.BIO_s_mem())
    new_out = _lib.BIO_new(_lib.BIO_s_mem())
    if new_into == _ffi.NULL or new_out == _ffi.NULL:  # out of memory: keep the old ones
        for bio in (new_into, new_out):
            if bio != _ffi.NULL:
                _lib.BIO_free(bio)
        return False
    # SSL_set_bio takes both new BIOs and frees the old pair (SSL_free frees
    # the new ones, as it did the old: pyOpenSSL sets no gc on them either)
    _lib.SSL_set_bio(connection._ssl, new_into, new_out)
    connection._into_ssl, connection._from_ssl = new_into, new_out
    return True


def set_key_exchange_groups(context: SSL.Context, groups: str) -> None:
    """Offer and accept only `groups` (OpenSSL's syntax: names joined by
    ':', e.g. "X25519MLKEM768:X25519"), in this order of preference.
    Raises ValueError if this OpenSSL knows none of them or the list is
    malformed."""
    if _lib.SSL_CTX_set1_curves_list(context._context, groups.encode("ascii")) != 1:
        _lib.ERR_clear_error()
        raise ValueError(groups)
