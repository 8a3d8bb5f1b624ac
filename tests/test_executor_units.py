"""Unit tests of the region executor's local pieces (the Runtime API path is in test_e2e_*)."""

from __future__ import annotations

import shutil
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


def test_published_app_digest_is_the_one_the_executor_checks(tmp_path: Path) -> None:
    """The digest an operator publishes for an app directory (`app_digest`, what goes into
    `allowed_app_digests`) is the digest the executor computes from the bundle bytes it pulls;
    the build is reproducible, so it can be published ahead of a run; and one changed byte of
    the app's code gives a digest the allow-list refuses."""
    from fedfsd.deploy.appbundle import app_digest, build_fab

    app = tmp_path / "app"
    shutil.copytree(APPS / "deploy_tiny", app, ignore=shutil.ignore_patterns("__pycache__"))
    bundle = build_fab(app)
    assert build_fab(app) == bundle  # fixed zip timestamps: same directory, same bytes
    published = app_digest(app)
    assert fab_digest(bundle) == published
    assert len(published) == 64 and int(published, 16) >= 0  # lower-case hex the policy accepts

    pol = tmp_path / "p.toml"
    pol.write_text(
        'region = "eu"\nepsilon_budget = 8.0\ndelta = 1e-6\nmin_noise_multiplier = 0.8\n'
        f'max_clip_norm = 1.0\nupdate_norm_bound = 5.0\nallowed_app_digests = ["{published}"]\n'
    )
    allowed = allowed_digests_from_policy(str(pol))
    assert fab_digest(bundle) in allowed

    code = app / "deploy_tiny_app.py"
    code.write_bytes(code.read_bytes() + b"\n")
    tampered = build_fab(app)
    assert tampered != bundle
    assert fab_digest(tampered) not in allowed


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
