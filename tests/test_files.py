"""rtunnel.files: private files (keys, tokens, the clients file) are written
owner-only and atomically, and a state directory that cannot be used is
reported with what to do.

Real files in a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from rtunnel.errors import StateDirError
from rtunnel.files import load_or_create_secret, replace_private, write_private


class FilesTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rtunnel-files-"))
        self.addCleanup(shutil.rmtree, self.dir, True)

    def mode(self, path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    def leftovers(self, directory: Path) -> list[str]:
        """Temporary files replace_private left in `directory`."""
        return [name for name in os.listdir(directory) if name.endswith(".tmp")]


class ReplacePrivateTests(FilesTestCase):
    def test_the_file_is_readable_by_its_owner_only_in_a_directory_made_private(self) -> None:
        path = self.dir / "state" / "server.key"
        replace_private(path, b"secret")
        self.assertEqual(path.read_bytes(), b"secret")
        self.assertEqual(self.mode(path), 0o600)
        self.assertEqual(self.mode(path.parent) & 0o077, 0)
        self.assertEqual(self.leftovers(path.parent), [])

    def test_a_reader_of_the_old_file_keeps_the_old_contents(self) -> None:
        path = self.dir / "clients.toml"
        replace_private(path, b"old contents")
        with open(path, "rb") as reader:
            replace_private(path, b"new")
            self.assertEqual(reader.read(), b"old contents")  # renamed over, not rewritten in place
        self.assertEqual(path.read_bytes(), b"new")
        self.assertEqual(self.mode(path), 0o600)

    def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(self) -> None:
        path = self.dir / "token"
        replace_private(path, b"kept")
        self.assertRaises(TypeError, replace_private, path, "not bytes")  # type: ignore[arg-type]
        self.assertEqual(path.read_bytes(), b"kept")
        self.assertEqual(self.leftovers(self.dir), [])

    def test_a_parent_that_is_a_file_is_named_in_the_error(self) -> None:
        (self.dir / "state").write_text("a file, not a directory")
        error = self.assertRaises(NotADirectoryError, replace_private, self.dir / "state" / "token", b"x")
        self.assertIn(f"{self.dir / 'state'} is not a directory", str(error))


class WritePrivateTests(FilesTestCase):
    def test_a_failure_says_which_file_and_what_to_do(self) -> None:
        (self.dir / "state").write_text("a file, not a directory")
        path = self.dir / "state" / "server.crt"
        error = self.assertRaises(StateDirError, write_private, path, b"x")
        self.assertIn(f"cannot write {path}", str(error))
        self.assertIn("choose another --state-dir", str(error))


class LoadOrCreateSecretTests(FilesTestCase):
    def test_a_missing_secret_is_made_once_and_then_reused(self) -> None:
        path = self.dir / "token"
        token, created = load_or_create_secret(path, "token", 24)
        self.assertTrue(created)
        self.assertEqual(len(token), 32)  # 24 bytes, URL-safe base64
        self.assertEqual(path.read_text(), token + "\n")
        self.assertEqual(self.mode(path), 0o600)
        self.assertEqual(load_or_create_secret(path, "token", 24), (token, False))

    def test_an_empty_file_gets_a_new_secret(self) -> None:
        path = self.dir / "token"
        path.write_text("\n")
        token, created = load_or_create_secret(path, "token", 16)
        self.assertTrue(created)
        self.assertTrue(token)
        self.assertEqual(path.read_text(), token + "\n")

    def test_a_secret_that_cannot_be_read_is_reported_by_what_it_is(self) -> None:
        path = self.dir / "admin-token"
        path.mkdir()  # reading a directory fails with an OSError, as root too
        error = self.assertRaises(StateDirError, load_or_create_secret, path, "admin token", 16)
        self.assertIn(f"cannot read the admin token {path}", str(error))
        self.assertIn("choose another --state-dir", str(error))
