"""The committed protobuf code is exactly what grpcio-tools generates from protos/."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTOS = sorted((ROOT / "protos" / "fedfsd" / "v1").glob("*.proto"))
GENERATED = ROOT / "fedfsd" / "proto" / "fedfsd" / "v1"


def test_regenerating_every_proto_gives_the_committed_files(tmp_path: Path) -> None:
    """Same command as `make protos`; every .proto has its committed pair and nothing else is
    committed (a removed .proto cannot leave a stale module behind)."""
    from grpc_tools import protoc  # a dev dependency: missing it is an error, not a skip

    assert [p.name for p in PROTOS] == ["layout.proto", "report.proto", "update.proto"]
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            *map(str, PROTOS),
        ]
    )
    assert rc == 0
    fresh_dir = tmp_path / "fedfsd" / "v1"
    names = sorted(p.name for p in fresh_dir.iterdir())
    assert names == sorted(f"{p.stem}_pb2{ext}" for p in PROTOS for ext in (".py", ".pyi"))
    committed = sorted(p.name for p in GENERATED.glob("*_pb2.py*"))
    assert committed == names, "a generated module has no .proto (or the reverse)"
    for name in names:
        fresh = (fresh_dir / name).read_bytes()
        assert fresh == (GENERATED / name).read_bytes(), (
            f"fedfsd/proto/fedfsd/v1/{name} is stale: run `make protos`"
        )


def test_manifest_round_trips() -> None:
    from fedfsd.wire import UpdateManifest, manifest_from_bytes

    m = UpdateManifest(region="eu", run_id="r1", round=3, update_norm=1.5, sha256="ab" * 32)
    back = manifest_from_bytes(m.SerializeToString())
    assert back == m
    with pytest.raises(ValueError):
        manifest_from_bytes(b"\xff\xff\xff")
