"""The bench's overhead measurements moved to :mod:`tokensaver.bench.overhead`; this name stays importable."""

from .bench.overhead import (
    SIZES,
    measure_memory,
    measure_overhead,
    measure_proxy,
    peak_memory,
    synthetic_request,
)

__all__ = ["SIZES", "measure_memory", "measure_overhead", "measure_proxy", "peak_memory", "synthetic_request"]
