"""Small durability helpers shared by the region's ledger, the aggregator's checkpoints and keys.

Both sides promise that what they report is on disk before anything depends on it; the directory
entry of a new or renamed file is only durable once its directory is fsync'd too. Secrets are
written to a fresh file (O_EXCL, mode 0600) that is renamed over the destination, so an existing
file's looser mode or a symlink planted at the destination never decides where a key goes or who
can read it. A full disk ends in one line naming the file, and no partial temporary is left.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from fedfsd.errors import EnvironmentFault

PRIVATE_MODE = 0o600


class DiskFullError(EnvironmentFault, OSError):
    """Writing `path` failed for lack of space (or quota); the temporary file is removed."""

    def __init__(self, path: str | Path, err: OSError) -> None:
        super().__init__(
            err.errno,
            f"no space left to write {path} ({os.strerror(err.errno or errno.ENOSPC)}); "
            "free space there and retry: nothing was replaced",
        )
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.args[1])


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so that files created or renamed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A new file beside `path`, renamed over it on success; removed on any failure.

    The temporary is created with O_CREAT|O_EXCL|O_NOFOLLOW and `mode` (then fchmod'ed to it,
    whatever the umask), fsync'd, then renamed: rename replaces a symlink at `path` itself and
    never writes through it. ENOSPC/EDQUOT/EFBIG become a DiskFullError naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in _NO_SPACE and not isinstance(err, DiskFullError):
            raise DiskFullError(path, err) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` atomically (see `atomic_file`)."""
    with atomic_file(path, mode) as fh:
        fh.write(data)


def write_private(path: str | Path, data: bytes) -> None:
    """Write key material: mode 0600 whatever existed before, never through a symlink."""
    write_atomic(path, data, PRIVATE_MODE)


def no_space_guard(path: str | Path, write: Callable[[], None]) -> None:
    """Run `write` (which writes `path`); turn a full disk into a DiskFullError naming `path`.

    For append-style writers (the ledger) that cannot use `atomic_file`: the caller still owns
    what a partial append leaves; this only makes the failure one line that names the file.
    """
    try:
        write()
    except OSError as err:
        if err.errno in _NO_SPACE and not isinstance(err, DiskFullError):
            raise DiskFullError(path, err) from None
        raise
