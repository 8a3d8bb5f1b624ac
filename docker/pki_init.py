"""One-shot PKI for the compose federation: CA, SuperLink certificate, one key pair per region.

Why: compose volumes must keep secrets apart. The CA key and the SuperLink key stay in the
aggregator's PKI volume; each region's private key goes into that region's own key volume; only
public material is copied out: ``ca.crt`` to the trust volume the regions mount read-only, and
each ``<region>.pub`` to the public-key volume the aggregator's registration step reads. Every
piece is made by fedfsd's own PKI code (`fedfsd.deploy.pki`, the code behind `fedfsd deploy pki`
and `fedfsd deploy keygen`). Re-running it never replaces existing keys (that would lock out
registered regions); delete a file to rotate it (docs/deploy.md).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import typer


def fail(msg: str) -> None:
    """One red line, exit 2 (no traceback)."""
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _copy_public(src: Path, dst_dir: Path) -> Path:
    """Copy a public file with mode 0644 (atomic replace, so readers never see half a file)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    tmp = dst_dir / f".{src.name}.tmp"
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dst_dir / src.name)
    return dst_dir / src.name


def main(
    pki: Path = typer.Option(..., help="Aggregator-only directory: CA and SuperLink key pair."),
    trust: Path = typer.Option(..., help="Public directory for ca.crt (regions mount it)."),
    pubkeys: Path = typer.Option(..., help="Public directory for <region>.pub (aggregator)."),
    keys: Path = typer.Option(..., help="Root of the per-region private key dirs KEYS/<region>/."),
    region: list[str] = typer.Option(..., "--region", help="Region name (repeatable)."),
    san: list[str] = typer.Option([], "--san", help="DNS name/IP regions dial (repeatable)."),
) -> None:
    """Create what is missing of the federation's PKI; print what exists."""
    from fedfsd.deploy import pki as fpki

    for name in region:
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            fail(f"--region must be alphanumeric (with - or _), got {name!r}")
    if len(set(region)) != len(region):
        fail(f"--region given twice: {sorted(region)}")

    server_cert = pki / "server.pem"
    if server_cert.is_file():
        have = set(fpki.server_sans(server_cert))
        if missing := [s for s in san if s not in have]:
            fail(f"{server_cert} lacks SANs {missing}; delete {pki}/* to re-create the PKI")
        server = fpki.ServerPKI(pki / "ca.crt", pki / "ca.key", server_cert, pki / "server.key")
        for path in (server.ca_cert, server.server_key):
            if not path.is_file():
                fail(f"{path} is missing next to {server_cert}; delete {pki}/* to re-create it")
        typer.echo(f"kept SuperLink certificate {server_cert}")
    else:
        server = fpki.create_server_pki(pki, list(san))
        typer.echo(f"created CA and SuperLink certificate for {', '.join(san) or 'localhost'}")
    _copy_public(server.ca_cert, trust)

    for name in region:
        kdir = keys / name
        private, public = kdir / name, kdir / f"{name}.pub"
        if private.is_file() and public.is_file():
            typer.echo(f"kept key pair of region {name}")
        else:
            fpki.create_node_keys(kdir, name)
            typer.echo(f"created key pair of region {name}")
        _copy_public(public, pubkeys)


if __name__ == "__main__":
    typer.run(main)
