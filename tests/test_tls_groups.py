"""--tls-groups: the control port's key exchange groups. By default the
server keeps OpenSSL's, the post-quantum hybrid X25519MLKEM768 first; a list
given replaces them; a list OpenSSL refuses stops the start with a message
saying what to give."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from rtunnel.errors import ConfigError
from rtunnel.tap.server_options import SERVER_OPTIONS
from tests.harness import Echo, Tunnel, Visitor, listen_target, visit, with_timeout


class TLSGroupsTests(unittest.TestCase):
    @defer.inlineCallbacks
    def negotiated_group(self, **server_overrides: Any) -> Any:
        """The group the client's link negotiated with a server started with
        `server_overrides`, after bytes went through a tunnel."""
        tunnel = Tunnel(self)
        yield tunnel.start_server(**server_overrides)
        _, target = listen_target(self, Echo)
        (public,) = yield tunnel.connect([(0, target)])
        received, _ = yield with_timeout(visit(public, Visitor(b"ping over the tunnel")), 10)
        self.assertEqual(received, b"ping over the tunnel")
        link = tunnel.client_service.client.link  # type: ignore[union-attr]
        return link.transport.getHandle().get_group_name()

    @defer.inlineCallbacks
    def test_by_default_the_post_quantum_hybrid_is_negotiated(self) -> Any:
        group = yield self.negotiated_group()
        self.assertEqual(group, "X25519MLKEM768")

    @defer.inlineCallbacks
    def test_a_group_list_given_replaces_the_default(self) -> Any:
        group = yield self.negotiated_group(tls_groups="X25519")
        self.assertEqual(group.lower(), "x25519")

    def test_a_list_openssl_refuses_is_a_config_error_saying_what_to_give(self) -> None:
        option = SERVER_OPTIONS["tls-groups"]
        with self.assertRaises(ConfigError) as caught:
            option.convert("X25519:NoSuchGroup")
        self.assertIn("--tls-groups 'X25519:NoSuchGroup'", str(caught.exception))
        self.assertIn("e.g. X25519MLKEM768:X25519", str(caught.exception))
        self.assertEqual(option.convert("X25519MLKEM768:X25519"), "X25519MLKEM768:X25519")
        self.assertIsNone(option.convert(""))
