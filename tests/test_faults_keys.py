"""Issue 20, items 4 and 7b: keys are 0600 whatever was there; a full disk names the file.

Every key writer is driven through its real CLI command (`fedfsd deploy keygen|pki`).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedfsd import durable
from fedfsd.cli import app


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def _run(*args: str) -> None:
    res = CliRunner().invoke(app, ["deploy", *args])
    assert res.exit_code == 0, res.output


def test_keygen_over_an_existing_0644_file_leaves_a_0600_key(tmp_path: Path) -> None:
    key = tmp_path / "eu"
    key.write_text("old")
    key.chmod(0o644)
    _run("keygen", "eu", "--out", str(tmp_path))
    assert _mode(key) == 0o600 and key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY")


def test_pki_over_a_0666_ca_key_leaves_0600_keys(tmp_path: Path) -> None:
    for name in ("ca.key", "server.key"):
        (tmp_path / name).write_text("old")
        (tmp_path / name).chmod(0o666)
    _run("pki", "--out", str(tmp_path))
    assert _mode(tmp_path / "ca.key") == 0o600 and _mode(tmp_path / "server.key") == 0o600
    assert (tmp_path / "ca.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY")


@pytest.mark.parametrize("cmd", ["keygen", "pki"])
def test_a_symlink_at_the_key_path_is_replaced_not_followed(tmp_path: Path, cmd: str) -> None:
    target = tmp_path / "elsewhere" / "victim"
    target.parent.mkdir()
    target.write_text("untouched")
    target.chmod(0o644)
    out = tmp_path / "keys"
    out.mkdir()
    link = out / ("eu" if cmd == "keygen" else "ca.key")
    link.symlink_to(target)
    _run(*(["keygen", "eu"] if cmd == "keygen" else ["pki"]), "--out", str(out))
    assert target.read_text() == "untouched" and _mode(target) == 0o644
    assert not link.is_symlink() and _mode(link) == 0o600


class _FillingFile:
    """A real file whose writes fail with ENOSPC after 64 KiB, as a full disk does."""

    def __init__(self, fh) -> None:  # type: ignore[no-untyped-def]
        self._fh, self._n = fh, 0

    def write(self, data) -> int:  # type: ignore[no-untyped-def]
        self._n += len(data)
        if self._n > 1 << 16:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._fh.write(data)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._fh, name)

    def __enter__(self) -> _FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()


def _fill_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fdopen
    monkeypatch.setattr(durable.os, "fdopen", lambda *a, **k: _FillingFile(real(*a, **k)))


def test_disk_full_during_a_release_cache_write_is_one_line_and_leaves_no_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedfsd.privacy.ledger import Ledger

    ledger = Ledger(tmp_path / "ledger.jsonl")
    _fill_disk(monkeypatch)
    with pytest.raises(durable.DiskFullError) as e:
        ledger.write_cache("run", 3, {"w": np.ones(1 << 16, np.float32)})
    msg = str(e.value)
    assert "\n" not in msg and str(ledger.cache_path("run", 3)) in msg and "no space" in msg
    assert list(ledger.cache_dir.iterdir()) == []


def test_disk_full_during_a_checkpoint_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedfsd.aggregator import checkpoint as ck

    ck.save_checkpoint(tmp_path, ck.Checkpoint(1, "r", {"w": np.zeros(4, np.float32)}))
    _fill_disk(monkeypatch)
    with pytest.raises(durable.DiskFullError, match="checkpoint.npz"):
        ck.save_checkpoint(tmp_path, ck.Checkpoint(2, "r", {"w": np.ones(1 << 16, np.float32)}))
    monkeypatch.undo()
    assert ck.load_checkpoint(tmp_path).round == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.CHECKPOINT]


def _can_mount_tmpfs(where: Path) -> bool:
    import subprocess

    if os.geteuid() != 0:
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    return r.returncode == 0


def test_disk_full_on_a_real_tiny_tmpfs(tmp_path: Path) -> None:
    import subprocess

    from fedfsd.privacy.ledger import Ledger

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if not _can_mount_tmpfs(mnt):
        pytest.skip("needs root and mount(8) for a 256 KiB tmpfs")
    try:
        ledger = Ledger(mnt / "ledger.jsonl")
        with pytest.raises(durable.DiskFullError, match="no space left to write"):
            ledger.write_cache("run", 1, {"w": np.ones(1 << 17, np.float32)})  # 512 KiB
        assert list(ledger.cache_dir.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
