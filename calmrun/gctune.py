"""Garbage-collector settings for a long-running worker process.

A worker process holds ~150,000 objects from its imports alone (pydantic, pydantic-ai, genai-prices'
price tables, aiokafka), and every decision allocates short-lived ones; CPython's default thresholds then
run full collections that rescan the whole startup heap again and again. In the benchmark that cost the
worker about a third of its CPU (``bench/results/results.md``). Once started, a worker freezes what
exists (``gc.freeze``: never scanned again, still freed by reference counting) and collects its young
generation less often. Only the process's owner calls this (the CLI, the benchmark worker), never a
library: the collector is process-wide.
"""

from __future__ import annotations

import gc


def settle_heap(threshold: int) -> int:
    """Freeze the objects alive now and set the young-generation threshold; returns how many were frozen.

    ``threshold`` 0 leaves the collector as it is.
    """
    if threshold <= 0:
        return 0
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(threshold, older, oldest)
    return gc.get_freeze_count()
