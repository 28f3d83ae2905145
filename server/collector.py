"""The service's settings for Python's cyclic collector, applied once per process after startup.

In a module of its own so that a benchmark's server can take the product's settings without
importing the product.
"""

from __future__ import annotations

import gc

_YOUNG_COLLECTION_EVERY = 3_000  # see freeze_startup_heap


def freeze_startup_heap() -> None:
    """Collect once, then hide every object alive now from the cyclic collector for good.

    Its full (generation 2) pass walks every tracked object: about 120,000 once grpcio, protobuf and
    SQLAlchemy are loaded, which took 60-80 ms here and stalled every call in flight (a warm's p99
    went from 2 ms to 60 ms). Frozen, those objects are never walked again; the pass sees only what
    the service allocated since. Call it once per process, after startup, never per request.

    Then the first generation is collected after 3,000 net allocations instead of 700. Every call
    allocates frames, coroutines, tuples and dicts that die with it; at 700, a collection ran every
    few calls and walked the objects of the 64 calls in flight, promoting them only to walk them again
    in the older generations. Measured (`python -m benchmarks.suite --scenarios hit,noop`, and
    `python -m benchmarks.warm_impact` for the p99 of live reads during a warm): 700, 3,784 req/s for a
    near-cache hit and a p99 ratio of 1.16 (1.11-1.29 in earlier runs); 3,000, 4,272 req/s and 1.16,
    1.16 and 1.23; 10,000, 4,725 req/s (as fast as with the collector off) but 1.35 twice, its longer
    young collections showing in the p99.
    Cycles that leak (exceptions with their tracebacks) are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(_YOUNG_COLLECTION_EVERY, 10, 10)
