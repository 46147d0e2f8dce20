"""rtunnel.server.claims: who holds each public name (docs/security.md, "One
port, several sessions of a credential"). Pure: holders are plain values,
no reactor, no sockets."""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.trial.unittest import SynchronousTestCase

from rtunnel.server.claims import ClaimRefused, LocalClaims, TcpPort

PORT = TcpPort("0.0.0.0", 4000)
OTHER = TcpPort("::", 4000)


@dataclass(eq=False)
class Holder:
    """A session as the registry sees it; `busy` are tags it uses elsewhere."""

    credential: str
    serial: int
    detached: bool = False  # the registry must not care
    busy: set[int] = field(default_factory=set)

    def still_wants(self, tag: int) -> bool:
        return tag not in self.busy


class OwnershipTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.claims: LocalClaims[Holder] = LocalClaims()

    def test_a_free_name_is_granted_and_has_no_previous_holder(self) -> None:
        alice = Holder("alice", 1)
        claimed = self.claims.claim(PORT, alice, 7)
        self.assertIsNone(claimed.previous)
        self.assertEqual((claimed.claim.name, claimed.claim.tag), (PORT, 7))
        self.assertIs(self.claims.holder(PORT), alice)
        self.assertEqual(self.claims.owner(PORT), "alice")
        self.assertIsNone(self.claims.owner(OTHER))  # another address is another name

    def test_another_credential_never_gets_a_claimed_name_even_while_its_holder_is_detached(self) -> None:
        alice = Holder("alice", 1)
        self.claims.claim(PORT, alice, 1)
        for detached in (False, True):
            alice.detached = detached
            refusal = self.assertRaises(ClaimRefused, self.claims.claim, PORT, Holder("bob", 2 + detached), 1)
            self.assertEqual((refusal.code, refusal.name), (ClaimRefused.IN_USE, PORT))
        self.assertIs(self.claims.holder(PORT), alice)
        self.assertEqual(self.claims.waiting(PORT), {})  # bob does not wait: it is not his

    def test_a_newer_holder_of_the_same_credential_takes_the_name_and_the_old_one_waits(self) -> None:
        old, new = Holder("alice", 1, detached=True), Holder("alice", 2)
        first = self.claims.claim(PORT, old, 1).claim
        claimed = self.claims.claim(PORT, new, 5)
        self.assertIs(claimed.previous, first)
        self.assertIs(self.claims.holder(PORT), new)
        self.assertEqual(self.claims.waiting(PORT), {old: 1})

    def test_an_older_holder_is_refused_taken_over_and_waits_once(self) -> None:
        old, new = Holder("alice", 1), Holder("alice", 2)
        self.claims.claim(PORT, new, 1)
        first = self.assertRaises(ClaimRefused, self.claims.claim, PORT, old, 3)
        again = self.assertRaises(ClaimRefused, self.claims.claim, PORT, old, 3)
        self.assertEqual((first.code, first.repeated, again.repeated), (ClaimRefused.TAKEN_OVER, False, True))
        self.assertIs(self.claims.holder(PORT), new)
        self.assertEqual(self.claims.waiting(PORT), {old: 3})

    def test_a_holder_claiming_its_own_name_under_a_new_tag_moves_it(self) -> None:
        alice = Holder("alice", 1)
        self.claims.claim(PORT, alice, 1)
        claimed = self.claims.claim(PORT, alice, 2)
        self.assertEqual((claimed.previous.tag, claimed.claim.tag), (1, 2))
        self.assertEqual(self.claims.waiting(PORT), {})  # nobody displaced


class ReleaseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.claims: LocalClaims[Holder] = LocalClaims()

    def test_release_hands_the_name_to_the_newest_waiting_holder(self) -> None:
        oldest, older, newest = Holder("alice", 1), Holder("alice", 2), Holder("alice", 3)
        holder = self.claims.claim(PORT, newest, 9).claim
        for waiter, tag in ((oldest, 4), (older, 5)):
            self.assertRaises(ClaimRefused, self.claims.claim, PORT, waiter, tag)
        heir = self.claims.release(holder)
        self.assertEqual((heir.holder, heir.tag), (older, 5))
        self.assertIs(self.claims.holder(PORT), older)
        self.assertEqual(self.claims.waiting(PORT), {oldest: 4})  # still waits, for the next release

    def test_a_waiter_that_no_longer_wants_the_tag_is_passed_over(self) -> None:
        old, newer, newest = Holder("alice", 1), Holder("alice", 2, busy={5}), Holder("alice", 3)
        holder = self.claims.claim(PORT, newest, 9).claim
        self.assertRaises(ClaimRefused, self.claims.claim, PORT, old, 4)
        self.assertRaises(ClaimRefused, self.claims.claim, PORT, newer, 5)
        self.assertIs(self.claims.release(holder).holder, old)

    def test_release_without_waiters_frees_the_name_for_anyone(self) -> None:
        holder = self.claims.claim(PORT, Holder("alice", 1), 1).claim
        self.assertIsNone(self.claims.release(holder))
        self.assertIsNone(self.claims.holder(PORT))
        self.assertIsNone(self.claims.claim(PORT, Holder("bob", 2), 1).previous)

    def test_release_without_handing_on_frees_the_name_and_forgets_its_waiters(self) -> None:
        old, new = Holder("alice", 1), Holder("alice", 2)
        holder = self.claims.claim(PORT, new, 1).claim
        self.assertRaises(ClaimRefused, self.claims.claim, PORT, old, 2)
        self.assertIsNone(self.claims.release(holder, hand_on=False))
        self.assertEqual((self.claims.holder(PORT), self.claims.waiting(PORT)), (None, {}))
        # so a later holder of another credential never hands it to alice's waiter
        bob = self.claims.claim(PORT, Holder("bob", 3), 1).claim
        self.assertIsNone(self.claims.release(bob))

    def test_a_stale_claim_releases_nothing(self) -> None:
        first = self.claims.claim(PORT, Holder("alice", 1), 1).claim
        second = self.claims.claim(PORT, Holder("alice", 2), 1).claim
        self.assertIsNone(self.claims.release(first))
        self.assertIs(self.claims.holder(PORT), second.holder)

    def test_a_granted_claim_ends_the_holders_waits_under_that_tag(self) -> None:
        old, new = Holder("alice", 1), Holder("alice", 2)
        self.claims.claim(PORT, new, 1)
        self.assertRaises(ClaimRefused, self.claims.claim, PORT, old, 3)
        self.claims.claim(OTHER, old, 3)  # the client took another address as that tunnel
        self.assertEqual(self.claims.waiting(PORT), {})

    def test_stop_waiting_forgets_one_tag_or_all(self) -> None:
        old, new = Holder("alice", 1), Holder("alice", 2)
        self.claims.claim(PORT, new, 1)
        self.claims.claim(OTHER, new, 2)
        self.assertRaises(ClaimRefused, self.claims.claim, PORT, old, 3)
        self.assertRaises(ClaimRefused, self.claims.claim, OTHER, old, 4)
        self.claims.stop_waiting(old, 3)
        self.assertEqual((self.claims.waiting(PORT), self.claims.waiting(OTHER)), ({}, {old: 4}))
        self.claims.stop_waiting(old)
        self.assertEqual(self.claims.waiting(OTHER), {})


class TransferTests(SynchronousTestCase):
    def test_transfer_goes_only_to_a_holder_of_the_same_credential(self) -> None:
        claims: LocalClaims[Holder] = LocalClaims()
        claim = claims.claim(PORT, Holder("alice", 1), 1).claim
        self.assertRaises(ValueError, claims.transfer, claim, Holder("bob", 2), 1)
        moved = claims.transfer(claim, Holder("alice", 2), 6)
        self.assertEqual((moved.credential, moved.tag), ("alice", 6))
        self.assertRaises(ValueError, claims.transfer, claim, Holder("alice", 3), 1)  # no longer current
