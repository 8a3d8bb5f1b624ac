"""A private scratch directory for tests that run long-lived processes (no tests here).

Not pytest's tmp_path: other pytest sessions on this machine prune /tmp/pytest-of-<user>/,
which would delete a live federation's files. The directory is removed afterwards unless a
test failed while it existed: then it is kept, and its path printed, so the region and
SuperLink logs of an order-dependent failure can still be read.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def private_dir(request: pytest.FixtureRequest, prefix: str) -> Iterator[Path]:
    """A fresh /tmp directory named `prefix`*, kept (and reported) if a test failed meanwhile."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    failed_before = request.session.testsfailed
    try:
        yield path
    finally:
        if request.session.testsfailed > failed_before:
            print(f"\nkept for inspection after a failure: {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)
