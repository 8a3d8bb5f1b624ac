"""Unit tests of the region executor's local pieces (the Runtime API path is in test_e2e_*)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fedfsd.region.executor import allowed_digests_from_policy, fab_digest, load_clientapp

APPS = Path(__file__).parent / "apps"


def test_load_clientapp_from_region_local_path() -> None:
    from flwr.clientapp import ClientApp

    app = load_clientapp("deploy_tiny_app:client", APPS / "deploy_tiny")
    assert isinstance(app, ClientApp)


@pytest.mark.parametrize("ref", ["no_colon", ":app", "mod:"])
def test_load_clientapp_rejects_malformed_reference(ref: str) -> None:
    with pytest.raises(ValueError, match="module:attr"):
        load_clientapp(ref)


def test_load_clientapp_rejects_non_clientapp() -> None:
    with pytest.raises(ValueError, match="not a flwr ClientApp"):
        load_clientapp("deploy_tiny_app:server", APPS / "deploy_tiny")


def test_fab_digest_is_sha256() -> None:
    assert fab_digest(b"abc") == hashlib.sha256(b"abc").hexdigest()


def test_allow_list_comes_from_the_validated_policy(tmp_path: Path) -> None:
    from fedfsd.config import PolicyError

    base = (
        'region = "eu"\nepsilon_budget = 8.0\ndelta = 1e-6\nmin_noise_multiplier = 0.8\n'
        "max_clip_norm = 1.0\nupdate_norm_bound = 5.0\n"
    )
    pol = tmp_path / "p.toml"
    pol.write_text(base + f'allowed_app_digests = ["{"a" * 64}"]\n')
    assert allowed_digests_from_policy(str(pol)) == ("a" * 64,)
    assert allowed_digests_from_policy(None) == ()
    pol.write_text(base + 'allowed_app_digests = ["nothex"]\n')
    with pytest.raises(PolicyError):
        allowed_digests_from_policy(str(pol))
