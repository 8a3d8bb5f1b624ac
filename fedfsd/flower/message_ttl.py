"""Flower 1.39's message time-to-live rules, for tests that check fedfsd's messages against them.

Why here: the TTL default, the SuperLink's tolerance and its expiry check live in non-public flwr
modules (`flwr.app.constants`, `flwr.common.constant`, `flwr.server.superlink.linkstate.utils`);
fedfsd's round timeouts must stay inside them, and tests/test_apps_message_expiry.py checks that
against Flower's own function rather than a copy of it.
"""

from __future__ import annotations

from flwr.app.constants import DEFAULT_TTL
from flwr.common.constant import MESSAGE_TTL_TOLERANCE
from flwr.server.superlink.linkstate.utils import message_ttl_has_expired

__all__ = ["DEFAULT_TTL", "MESSAGE_TTL_TOLERANCE", "message_ttl_has_expired"]
