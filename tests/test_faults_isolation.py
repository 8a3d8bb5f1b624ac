"""Issue 20, item 6: a `fedfsd/` folder in the working directory changes nothing.

The commands are the real launchers' argv and environment (`supernode_argv`, `executor_argv`,
`flower_env`), run from a directory holding a poisoned `fedfsd/__init__.py` that writes a marker.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedfsd.deploy.federation import executor_argv, supernode_argv
from fedfsd.deploy.processes import ProcessGroup, flower_env


@pytest.fixture
def poisoned_cwd(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    pkg = tmp_path / "cwd" / "fedfsd"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    for sub in ("deploy", "region"):
        (pkg / sub).mkdir()
        (pkg / sub / "__init__.py").write_text("")
    return pkg.parent, marker


@pytest.mark.parametrize("which", ["supernode", "executor"])
def test_launchers_ignore_a_fedfsd_folder_in_the_working_directory(
    poisoned_cwd: tuple[Path, Path], which: str
) -> None:
    cwd, marker = poisoned_cwd
    argv = (
        supernode_argv("127.0.0.1:9092", 9094, {"region": "eu"}, None, None)
        if which == "supernode"
        else executor_argv(9094, None, "fedfsd.region.client_app:app", None, None)
    )
    res = subprocess.run(
        [*argv, "--help"], cwd=cwd, env=flower_env(), capture_output=True, text=True, timeout=120
    )
    assert not marker.exists(), res.stderr[-2000:]
    assert res.returncode == 0, res.stderr[-2000:]


def test_process_group_children_get_a_safe_path(poisoned_cwd: tuple[Path, Path]) -> None:
    """Any Python child started through ProcessGroup (its default env) is safe too."""
    cwd, marker = poisoned_cwd
    group = ProcessGroup(cwd.parent / "logs")
    try:
        proc = group.start("probe", [sys.executable, "-m", "fedfsd.deploy.watchdog"], cwd=cwd)
        proc.popen.wait(timeout=120)
    finally:
        group.stop_all()
    assert not marker.exists(), proc.log_tail()
