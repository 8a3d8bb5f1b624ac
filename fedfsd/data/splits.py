"""Episode-level train / val / test splits: whole episodes, seeded, never frames.

Why episodes: frames of one episode are strongly correlated, so a frame-level split would leak
the test set into training. Test episodes are chosen exactly as before validation splits existed
(same seed, same episode count -> same test episodes), so test numbers stay comparable; the
validation episodes are carved out of the remaining ones. Schedules and hyper-parameters are
chosen on "val"; reported numbers come from "test", which no choice has seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfsd.errors import InputError

SPLITS = ("train", "val", "test", "all")
TEST_FRACTION = 0.2
VAL_FRACTION = 0.1


def train_share(appearances: float) -> float:
    """Expected share of fleet vehicles with train frames when each drives in `appearances`
    episodes: episodes, not vehicles, are split, so a vehicle misses train only if every one of
    its episodes is val or test. 97.3% at three appearances, 70% at one (measured: cn 69.5%)."""
    return 1.0 - (VAL_FRACTION + TEST_FRACTION) ** appearances


class NoValidationSplit(InputError, ValueError):
    """The dataset was generated before validation splits existed (its manifest has none)."""


def pick_test_episodes(
    episodes: np.ndarray, seed: int, fraction: float = TEST_FRACTION
) -> np.ndarray:
    """The episodes held out for testing: a seeded choice of whole episodes (never frames)."""
    eps = np.unique(episodes)
    if len(eps) < 2:
        return np.array([], dtype=np.int64)
    n_test = max(1, int(round(fraction * len(eps))))
    rng = np.random.default_rng([int(seed), 4])
    return np.sort(rng.choice(eps, size=n_test, replace=False))


def val_episodes(
    episodes: np.ndarray, test: np.ndarray, seed: int, fraction: float = VAL_FRACTION
) -> np.ndarray:
    """Validation episodes, drawn from the non-test ones; at least one train episode stays.

    Non-empty whenever `fraction` > 0 and at least two non-test episodes exist (so from 3
    episodes on; a 5-episode dataset has 1 test, 1 val and 3 train episodes).
    """
    rest = np.setdiff1d(np.unique(episodes), test)
    if fraction <= 0 or len(rest) < 2:
        return np.array([], dtype=np.int64)
    n_val = min(len(rest) - 1, max(1, int(round(fraction * len(np.unique(episodes))))))
    rng = np.random.default_rng([int(seed), 5])
    return np.sort(rng.choice(rest, size=n_val, replace=False))


@dataclass(frozen=True)
class EpisodeSplit:
    """Which episodes belong to which split; `has_val` is False for datasets that predate val."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    has_val: bool

    def episodes(self, split: str) -> np.ndarray:
        """Episodes of one split ("all": every episode)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "all":
            return np.sort(np.concatenate([self.train, self.val, self.test]))
        if split == "val" and not self.has_val:
            raise NoValidationSplit(
                "this dataset predates validation splits (its manifest has no "
                "split.val_fraction): regenerate it to get a 'val' split"
            )
        return getattr(self, split)


def split_config(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's split settings with defaults; `val_fraction` is None for old datasets."""
    cfg = manifest.get("split", {}) or {}
    return {
        "by": "episode",
        "seed": int(cfg.get("seed", manifest["seed"])),
        "test_fraction": float(cfg.get("test_fraction", TEST_FRACTION)),
        "val_fraction": float(cfg["val_fraction"]) if "val_fraction" in cfg else None,
    }


def split_episodes(manifest: dict[str, Any], episodes: np.ndarray) -> EpisodeSplit:
    """Assign every episode of a dataset to train, val or test from its manifest's settings."""
    cfg = split_config(manifest)
    eps = np.unique(np.asarray(episodes, dtype=np.int64))
    test = pick_test_episodes(eps, cfg["seed"], cfg["test_fraction"]).astype(np.int64)
    has_val = cfg["val_fraction"] is not None
    val = (
        val_episodes(eps, test, cfg["seed"], cfg["val_fraction"]).astype(np.int64)
        if has_val
        else np.array([], dtype=np.int64)
    )
    train = np.setdiff1d(eps, np.concatenate([test, val])).astype(np.int64)
    return EpisodeSplit(train=train, val=val, test=test, has_val=has_val)
