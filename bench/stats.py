"""Percentiles and summaries without numpy (the client workers import only grpc and the stubs)."""
from __future__ import annotations

import math
from typing import Iterable, Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (q in 0..100); None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def summary(values: Iterable[float]) -> dict[str, float | int | None]:
    """count, p50, p90, p99, max and mean of ``values`` (milliseconds in, milliseconds out)."""
    data = sorted(values)
    mean = sum(data) / len(data) if data else None
    return {
        "count": len(data),
        "p50": percentile(data, 50),
        "p90": percentile(data, 90),
        "p99": percentile(data, 99),
        "max": float(data[-1]) if data else None,
        "mean": mean,
    }
