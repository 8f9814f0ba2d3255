"""py-spy on the server process: record while a workload re-runs, then the top frames.

py-spy samples with ``--gil``: only the thread holding the GIL, i.e. where the server spends the one
core its Python code can use (waits on epoll, locks or fsync release the GIL and are left out).
``--native`` adds C frames: the garbage collector, protobuf's upb, libc's send/write, and grpc's
Cython core (its symbols are stripped, so all of it is counted as one ``[native] cygrpc`` frame).
Native sampling pauses the server for each sample and costs CPU on the shared 2 cores, which is why
the bench measures first and profiles in a separate re-run of the same workload.
"""
from __future__ import annotations

import asyncio
import collections
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

from . import procs

# Frames every stack passes through (the event loop, thread bootstrap, runpy): not informative inclusively.
_GENERIC = (
    "asyncio/", "threading.py", "runpy", "<module>", "selectors.py", "concurrent/futures", "cli.py", "__main__.py",
    "[native]", ".c:", ".h:", "libpython", "libc.so", "_asynciomodule", "(python", "gc_probe.py",
)  # fmt: skip
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def _short(frame: str) -> str:
    """``func (path/to/pkg/module.py:12)`` -> ``func (pkg/module.py:12)``; an unsymbolised C address
    ``0x7f.. (lib.so)`` -> ``[native] lib.so``, so all of one library's such frames add up."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    if m.group("func").startswith("0x"):
        lib = m.group("file").rsplit("/", 1)[-1]
        return f"[native] {lib.split('.cpython')[0]}"
    path = m.group("file")
    for marker in ("site-packages/", "flowsession_server/", "bench/", "lib/python3"):
        i = path.find(marker)
        if i >= 0:
            path = path[i:] if marker != "lib/python3" else path[path.find("/", i + len(marker)) + 1 :]
            break
    line = f":{m.group('line')}" if m.group("line") else ""
    return f"{m.group('func')} ({path}{line})"


def parse_collapsed(text: str, top: int = 8) -> dict[str, Any]:
    """Self (leaf) and inclusive shares of the samples in py-spy's raw (collapsed stack) output."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f]
        if frames and frames[0].startswith("thread ("):
            threads[frames[0]] += n
            frames = frames[1:]
        if not frames:
            continue
        total += n
        self_counts[_short(frames[-1])] += n
        for frame in {_short(f) for f in frames}:
            incl_counts[frame] += n

    def share(counter: collections.Counter[str], skip_generic: bool = False) -> list[str]:
        rows = []
        for frame, n in counter.most_common():
            if skip_generic and any(g in frame for g in _GENERIC):
                continue
            rows.append(f"{100.0 * n / total:.1f}% {frame}")
            if len(rows) >= top:
                break
        return rows

    return {
        "samples": total,
        "top_self": share(self_counts) if total else [],
        "top_inclusive": share(incl_counts, skip_generic=True) if total else [],
        "threads": len(threads),
    }


async def record_during(
    pid: int, seconds: float, out: Path, workload: Callable[[], Awaitable[Any]], rate: int = 250
) -> dict[str, Any] | None:
    """Runs py-spy on ``pid`` for ``seconds`` while ``workload()`` runs; None when py-spy is missing."""
    exe = py_spy()
    if exe is None:
        return None
    argv = [
        exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", str(rate),
        "--format", "raw", "--output", str(out), "--native", "--gil", "--threads",
    ]  # fmt: skip
    # Dies with the bench, as its servers and workers do: a bench killed with SIGKILL would leave it
    # sampling for the rest of its --duration.
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, preexec_fn=procs.die_with_parent
    )
    work = asyncio.ensure_future(workload())
    try:
        _, err = await asyncio.wait_for(proc.communicate(), seconds + 30)
        await work
    finally:
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0 or not out.exists():
        return {"error": (err or b"").decode(errors="replace")[-500:]}
    result = parse_collapsed(out.read_text(errors="replace"))
    result["seconds"] = seconds
    result["rate_hz"] = rate
    return result
