"""Runs a server module in this process with a garbage-collector timer attached.

``python -m bench.gc_probe OUT.jsonl MODULE ARGS...`` installs a ``gc.callbacks`` hook, then runs
``MODULE`` as ``__main__`` (``flowsession_server`` or ``bench.bare_server``) with ARGS. At exit it writes
OUT.jsonl: one line per collection, ``[wall-clock start, generation, milliseconds]``. The hook costs two
clock reads per collection; the server's own code is untouched.
"""
from __future__ import annotations

import atexit
import gc
import json
import runpy
import sys
import time
from typing import Any


def main() -> None:
    out_path, module, *args = sys.argv[1:]
    collections: list[tuple[float, int, float]] = []
    started = [0.0, 0.0]

    def hook(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            started[1] = time.time()
        else:
            collections.append((started[1], info.get("generation", 0), (time.perf_counter() - started[0]) * 1000.0))

    def dump() -> None:
        with open(out_path, "w") as f:
            for wall, gen, ms in collections:
                f.write(f"[{wall:.4f},{gen},{ms:.3f}]\n")

    atexit.register(dump)
    gc.callbacks.append(hook)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def load(path: str) -> list[list[float]]:
    """Every collection the probe saw, ``[wall start, generation, ms]``; empty when there is none."""
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError:
        return []


def window(data: list[list[float]], start: float, stop: float) -> dict[str, Any]:
    """Collections that started between two wall-clock times, and the time they took."""
    inside = [c for c in data if start <= c[0] <= stop]
    count = [0, 0, 0]
    ms = [0.0, 0.0, 0.0]
    for _, gen, took in inside:
        count[int(gen)] += 1
        ms[int(gen)] += took
    return {
        "collections_by_generation": count,
        "ms_by_generation": [round(x, 1) for x in ms],
        "longest_pause_ms": round(max((c[2] for c in inside), default=0.0), 1),
        "pauses_over_10ms": sum(1 for c in inside if c[2] >= 10.0),
        "pauses_over_50ms": sum(1 for c in inside if c[2] >= 50.0),
    }


def overlapping(data: list[list[float]], start: float, stop: float, min_ms: float = 5.0) -> list[list[float]]:
    """Collections of at least ``min_ms`` that overlap [start, stop] (wall-clock seconds)."""
    return [c for c in data if c[2] >= min_ms and c[0] <= stop and c[0] + c[2] / 1000.0 >= start]


if __name__ == "__main__":
    main()
