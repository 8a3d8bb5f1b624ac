"""The aggregator's run config (Flower `run_config`, hyphenated keys), validated with pydantic.

Only this side's knobs live here. Everything the regions receive is a *request*: each region's
policy can only tighten it (fedfsd.config.RegionPolicy.effective).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError, model_validator

from fedfsd.errors import InputError
from fedfsd.run_config import (  # noqa: F401  (re-exported for existing callers)
    DEFAULT_N_FEATURES,
    DEFAULT_N_LABELS,
    NOMINAL_PLAN,
    PLAN_KEYS,
    RunConfig,
    default,
)

# The keys, defaults and help texts live in fedfsd.run_config; these names stay for callers.
DEFAULT_ROUNDS = default("num-server-rounds")
DEFAULT_LOCAL_STEPS = default("local-steps")
DEFAULT_VEHICLES_PER_STEP = default("vehicles-per-step")
DEFAULT_NOISE_MULTIPLIER = default("noise-multiplier")
DEFAULT_LR = default("lr")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam")


class SettingsError(InputError, ValueError):
    """Bad run config; the message names the key."""


class RunSettings(RunConfig):
    """Validated run config of one federation run (keys and defaults: fedfsd.run_config)."""

    @model_validator(mode="after")
    def _run_dir_absolute(self) -> RunSettings:
        for key, value in (
            ("run-dir", self.run_dir),
            ("plan", self.plan),
            ("initial-model", self.initial_model),
            ("region-keys", self.region_keys),
        ):
            if value and not Path(value).is_absolute():
                raise ValueError(f"{key} must be an absolute path, got {value!r}")
        if self.server_optimizer == "fedavgm" and self.server_momentum <= 0:
            raise ValueError("server-optimizer fedavgm needs server-momentum > 0")
        if self.server_optimizer == "fedadam" and self.server_momentum > 0:
            raise ValueError("server-momentum is for fedavg/fedavgm; fedadam uses server-beta1")
        return self

    @property
    def node_wait_s(self) -> float:
        """A run config that omits node-wait (built in Python) waits round-timeout."""
        return self.node_wait if "node_wait" in self.model_fields_set else self.round_timeout

    @property
    def evaluate_timeout_s(self) -> float:
        """A run config that omits evaluate-timeout (built in Python) waits round-timeout."""
        if "evaluate_timeout" in self.model_fields_set:
            return self.evaluate_timeout
        return self.round_timeout

    def evaluates_after(self, rnd: int) -> bool:
        """Whether round `rnd` ends with an evaluate exchange."""
        return rnd % self.evaluate_every == 0 or rnd >= self.num_server_rounds


def read_plan(path: str | Path) -> dict[str, Any]:
    """The run-config keys (PLAN_KEYS) of a `fedfsd privacy plan --json` file.

    Only a JSON file is read: the aggregator does not import the privacy side.
    """
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise SettingsError(f"run config plan: cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise SettingsError(f"run config plan: {path} is not JSON: {e}") from None
    cfg = doc.get("run_config") if isinstance(doc, dict) else None
    if not isinstance(cfg, dict) or not cfg:
        raise SettingsError(f"run config plan: {path} has no run_config (use fedfsd privacy plan)")
    if unknown := sorted(set(cfg) - set(PLAN_KEYS)):
        raise SettingsError(f"run config plan: {path} sets unknown key(s) {unknown}")
    return dict(cfg)


def parse_settings(run_config: Mapping[str, Any]) -> RunSettings:
    """Validate a Flower run config; SettingsError names the first bad key.

    With `plan` set, the plan file's schedule replaces those keys of the run config.
    """
    run_config = dict(run_config)
    if run_config.get("plan"):
        if not Path(str(run_config["plan"])).is_absolute():
            raise SettingsError(
                f"run config plan: must be an absolute path, got {run_config['plan']!r}"
            )
        run_config.update(read_plan(str(run_config["plan"])))
    try:
        return RunSettings.model_validate(run_config)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "<run config>"
        raise SettingsError(f"run config {key}: {err['msg']}") from None
