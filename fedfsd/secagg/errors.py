"""The errors the secure-aggregation protocol raises, on fedfsd's common bases.

Why three kinds: a refused message (bad signature, replay, tampered share) is an integrity
failure that the round survives (the message is dropped and logged); an abort (too few
survivors) ends the round with nothing unmasked; a configuration that would overflow the ring
or break the threshold rule is bad input and must be fixed before any round starts.
"""

from __future__ import annotations

from fedfsd.errors import FedfsdError, InputError, IntegrityError


class SecAggConfigError(InputError, ValueError):
    """Parameters that cannot give a correct or safe round (overflow, threshold, sizes)."""

    border_reason = "secure aggregation: bad parameters"


class SecAggRefused(IntegrityError, ValueError):
    """A refused message: bad signature, replay, out of stage, tampered, not a participant."""

    border_reason = "secure aggregation: message refused"


class SecAggAbort(FedfsdError, RuntimeError):
    """The round aborted (fewer than t regions left at a stage): nothing was unmasked."""

    border_reason = "secure aggregation: round aborted"
