"""Python's cyclic garbage collector, paced for a run that makes a model call's worth of objects per call."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

YOUNG_ALLOCATIONS = 50_000
"""Container allocations between two collections of the youngest generation, in a run (CPython's default: 700)."""


@contextlib.contextmanager
def paced_collection(young: int = YOUNG_ALLOCATIONS) -> Iterator[None]:
    """Collect the youngest generation every `young` allocations instead of every 700, restoring the pace on exit.

    A build allocates a few dicts and lists for each model call (its request, call row and stage row) and keeps a
    shard's rows alive until the shard is written. At the default pace the collector ran some thirty times per
    thousand calls, and its passes over the older generations walked the rows held: about a tenth of factory's
    own CPU time per call (bench/scale.py). Little of what a run makes is cyclic, and each collection still comes,
    only less often, so memory holds at most the garbage of `young` allocations more.
    """
    before = gc.get_threshold()
    gc.set_threshold(young, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
