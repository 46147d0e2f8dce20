"""rtunnel.openssl_private: every private pyOpenSSL name rtunnel uses exists
on the installed pyOpenSSL, and no other module of rtunnel uses one."""

from __future__ import annotations

import re
from pathlib import Path

from OpenSSL import SSL
from OpenSSL._util import lib
from twisted.trial import unittest

from rtunnel.openssl_private import PRIVATE_NAMES

ROOT = Path(__file__).resolve().parent.parent


class PrivateNamesTests(unittest.SynchronousTestCase):
    def test_every_private_name_exists_on_the_installed_pyopenssl(self) -> None:
        context = SSL.Context(SSL.TLS_METHOD)
        holders = {"Connection": SSL.Connection(context, None), "Context": context, "lib": lib}
        missing = [f"{where}.{name}" for where, name in PRIVATE_NAMES if not hasattr(holders[where], name)]
        self.assertEqual(missing, [], "pyOpenSSL lacks these: rtunnel.openssl_private must change")

    def test_no_other_module_uses_a_private_pyopenssl_name(self) -> None:
        # (Context._context is not looked for: rtunnel's own classes have a _context too)
        attributes = sorted(name for where, name in PRIVATE_NAMES if where == "Connection")
        pattern = re.compile("|".join([r"OpenSSL\._util\b", *(r"\." + re.escape(n) + r"\b" for n in attributes)]))
        users = [
            str(path.relative_to(ROOT))
            for path in sorted((ROOT / "rtunnel").rglob("*.py"))
            if path.name != "openssl_private.py" and pattern.search(path.read_text())
        ]
        self.assertEqual(users, [])
