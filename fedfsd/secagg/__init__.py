"""Secure aggregation (SecAgg+-style) for fedfsd: the aggregator learns only the regions' sum.

A pure library driven message by message (bytes in, bytes out): `RegionSession` on the region,
`AggregatorSession` on the aggregator, `Quantizer` between floats and Z_{2^b}. Protocol, threat
model and bit-width analysis: docs/privacy.md, "Secure aggregation". Only cryptography,
pycryptodome, msgpack and numpy are imported, so the aggregator side may use it freely.
"""

from fedfsd.secagg.aggregator import AggregatorSession
from fedfsd.secagg.errors import SecAggAbort, SecAggConfigError, SecAggRefused
from fedfsd.secagg.params import RoundParams
from fedfsd.secagg.quantize import Quantizer, choose_bit_width, from_ring, sum_bound, to_ring
from fedfsd.secagg.region import RegionSession

__all__ = [
    "AggregatorSession",
    "Quantizer",
    "RegionSession",
    "RoundParams",
    "SecAggAbort",
    "SecAggConfigError",
    "SecAggRefused",
    "choose_bit_width",
    "from_ring",
    "sum_bound",
    "to_ring",
]
