"""The committed protobuf code is exactly what grpcio-tools generates from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO = "fedfsd/v1/update.proto"


def test_regenerating_update_proto_gives_identical_files(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(ROOT / "protos" / PROTO),
        ],
        check=True,
    )
    for name in ("update_pb2.py", "update_pb2.pyi"):
        fresh = (tmp_path / "fedfsd" / "v1" / name).read_bytes()
        committed = (ROOT / "fedfsd" / "proto" / "fedfsd" / "v1" / name).read_bytes()
        assert fresh == committed, f"fedfsd/proto/fedfsd/v1/{name} is stale: run `make protos`"


def test_manifest_round_trips() -> None:
    from fedfsd.wire import UpdateManifest, manifest_from_bytes

    m = UpdateManifest(region="eu", run_id="r1", round=3, update_norm=1.5, sha256="ab" * 32)
    back = manifest_from_bytes(m.SerializeToString())
    assert back == m
    with pytest.raises(ValueError):
        manifest_from_bytes(b"\xff\xff\xff")
