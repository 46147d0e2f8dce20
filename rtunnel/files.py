"""Private files (keys, tokens, the clients file): written atomically, mode 0600."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path

from rtunnel.errors import StateDirError


def replace_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` readable by its owner only (0600), atomically:
    a temp file in the same directory, fsync, renamed over `path`, so a
    reader never sees a partial file. The directory is made (0700) if
    missing. Raises OSError; callers say what the file is."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise NotADirectoryError(0, f"{path.parent} is not a directory") from None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_private(path: Path, data: bytes) -> None:
    """replace_private for a file of the state directory, failing with a
    StateDirError that says what to do."""
    try:
        replace_private(path, data)
    except OSError as e:
        raise StateDirError(
            f"cannot write {path}: {e.strerror or e}. Free some space or fix the "
            "permissions, or choose another --state-dir."
        ) from None


def load_or_create_secret(path: Path, what: str, nbytes: int) -> tuple[str, bool]:
    """The token kept in `path`; if the file is missing or empty, a new one
    (`nbytes` random bytes, URL-safe) is written with write_private.
    Returns (token, created)."""
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    except OSError as e:
        raise StateDirError(
            f"cannot read the {what} {path}: {e.strerror or e}; fix its permissions or choose another --state-dir"
        ) from None
    if token:
        return token, False
    token = secrets.token_urlsafe(nbytes)
    write_private(path, (token + "\n").encode())
    return token, True
