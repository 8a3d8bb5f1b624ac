"""Small real datasets for the finetune/pretrain tests (no tests here).

A shortened copy of the eu profile (10 s episodes, 16 vehicles per episode) keeps generation to
a few seconds while every frame still comes from the simulator's driver models.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def tiny_profile(root: Path, name: str) -> Path:
    """The eu profile renamed to `name`, with short episodes and light traffic."""
    text = resources.files("fedfsd.data").joinpath("profiles/eu.toml").read_text()
    for old, new in (
        ('name = "eu"', f'name = "{name}"'),
        ("duration_s = 20", "duration_s = 10"),
        ("vehicles_per_episode = 24", "vehicles_per_episode = 16"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    path = root / f"{name}.toml"
    path.write_text(text)
    return path


def tiny_dataset(root: Path, name: str, seed: int, vehicles: int = 16, episodes: int = 10) -> Path:
    """Generate (once per path) a tiny dataset of profile `name` with train/val/test episodes."""
    from fedfsd.data.generate import generate_dataset

    out = root / f"{name}-{seed}"
    if not (out / "manifest.json").exists():
        generate_dataset(
            tiny_profile(root, name), vehicles, episodes, seed, out, workers=2, progress=False
        )
    return out
