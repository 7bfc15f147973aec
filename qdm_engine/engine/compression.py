"""Compatibility names for the compression conditions, which live in `qdm_engine.engine.compress`."""

from qdm_engine.engine.compress import (  # noqa: F401
    FP, METHODS, FPWeights, ModelState, find_targets, parse_bits, parse_method, register, target_weights,
)
from qdm_engine.engine.compress.rtn import RTN  # noqa: F401
from qdm_engine.engine.compress.sparsity import Magnitude, MagnitudePrune  # noqa: F401

