"""Skip a test whose environment is missing, or fail it where CI says it must be there.

Why: the residency and fault tests need the network test bed (root, `ip`, `nft`, `tc`, network
namespaces), the compose test a container engine. A skip is right on a laptop, but a CI run that
skips them all would go green without ever checking data residency. `.ci/run` exports
FEDFSD_REQUIRE_NETBED=1; under it a missing bed or engine fails the test with the reason.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE_ENV = "FEDFSD_REQUIRE_NETBED"


def required() -> bool:
    """True when the environment says the bed must be there (any value but "" and "0")."""
    return os.environ.get(REQUIRE_ENV, "").strip() not in ("", "0")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip with `reason`, or fail with it when the bed is required."""
    if required():
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def require_netbed() -> None:
    """Return when network namespaces can be built here; otherwise skip or fail."""
    from .fixtures import _probe_namespaces

    reason = _probe_namespaces()
    if reason:
        skip_or_fail(reason)
