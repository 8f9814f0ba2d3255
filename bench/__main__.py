"""``python -m bench [--quick]``: the flowsession benchmark (`make bench`).

Starts its own servers on 127.0.0.1 with fresh temporary databases, drives them from separate client
processes (bench/worker.py), and writes bench/results/<date>.json, bench/results/<date>.png and
bench/results/latest.md (also printed). ``--quick`` scales counts down 10x for a ~1 minute smoke run
and writes <date>-quick.* instead, leaving the full results alone.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import importlib.util
import os
import platform
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
NEEDED = ("psutil", "matplotlib")
INSTALL_HINT = ".venv/bin/pip install -e '.[bench]'"


def _check_deps() -> None:
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        sys.stderr.write(
            f"bench: missing {', '.join(missing)} (the bench's extra dependencies). Run:\n    {INSTALL_HINT}\n"
        )
        raise SystemExit(2)


def _raise_nofile() -> dict[str, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    return {"before": soft, "now": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _filesystem(path: Path) -> str:
    import psutil

    best = None
    for part in psutil.disk_partitions(all=True):
        if str(path).startswith(part.mountpoint) and (best is None or len(part.mountpoint) > len(best.mountpoint)):
            best = part
    return f"{best.fstype} ({best.mountpoint})" if best else "unknown"


def machine(workdir: Path, nofile: dict[str, int]) -> dict[str, Any]:
    import grpc
    import psutil
    from google import protobuf

    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": protobuf.__version__,
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "db_filesystem": _filesystem(workdir),
        "rlimit_nofile": nofile,
    }


def code_info() -> dict[str, Any]:
    from .procs import ignored_server_env

    dirty = _git("status", "--porcelain", "--", "server", "clients", "protos")
    return {"git_commit": _git("rev-parse", "HEAD"), "server_tree_dirty": bool(dirty), "dirty_files": dirty.splitlines(),
            "server_env_ignored": ignored_server_env()}  # fmt: skip


def snapshot_sources(workdir: Path) -> dict[str, Any]:
    """Copies the server and client packages as they are now into the work dir and puts the copy first on
    every child's PYTHONPATH: each server the run starts, early or late, runs the same code even while
    the working tree changes, and the digest says which code that was."""
    import flowsession
    import flowsession_server

    src = workdir / "src"
    digest = hashlib.sha256()
    for module in (flowsession_server, flowsession):
        origin = Path(module.__file__).parent
        shutil.copytree(origin, src / origin.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for f in sorted((src / origin.name).rglob("*")):
            if f.is_file():
                digest.update(str(f.relative_to(src)).encode())
                digest.update(f.read_bytes())
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(src) + (os.pathsep + previous if previous else "")
    seen = subprocess.run(
        [sys.executable, "-c", "import flowsession_server, flowsession.v1.session_pb2 as m; print(flowsession_server.__file__)"],
        capture_output=True, text=True, timeout=60, env={**os.environ},
    ).stdout.strip()  # fmt: skip
    if not seen.startswith(str(src)):
        raise SystemExit(f"bench: the snapshot of the server code is not what children import ({seen!r})")
    return {"snapshot_sha256": digest.hexdigest()[:16], "copied_from": str(Path(flowsession_server.__file__).parent)}


def write_outputs(results: dict[str, Any], log: Any) -> None:
    """Targets, notes and summary from the raw figures, then <date>.json, <date>.png and latest.md."""
    from . import report

    results["method"] = report.METHOD
    results["cpu_per_change"] = report.cpu_per_change(results)
    targets = report.evaluate(results)
    for t in targets:
        if not t["pass"]:
            t["notes"] = report.notes_for(t, results)
    results["targets"] = targets
    results["summary"] = {"targets": len(targets), "passed": sum(t["pass"] for t in targets),
                          "missed": [t["key"] for t in targets if not t["pass"]]}  # fmt: skip
    quick = results["scale"]["quick"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = results["date"] + ("-quick" if quick else "")
    report.write_json(RESULTS / f"{stem}.json", results)
    md = report.markdown(results, targets)
    (RESULTS / ("latest-quick.md" if quick else "latest.md")).write_text(md)
    report.chart(results, targets, RESULTS / f"{stem}.png")
    print(md)
    log(f"wrote {RESULTS / (stem + '.json')}, {stem}.png and {'latest-quick.md' if quick else 'latest.md'}")


async def _run(args: argparse.Namespace) -> int:
    from .run import Bench, Scale

    scale = Scale.quick_run() if args.quick else Scale.full()
    workdir = Path(tempfile.mkdtemp(prefix="flowsession-bench-", dir=args.tmpdir))
    started = time.monotonic()
    t0 = dt.datetime.now().astimezone()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    nofile = _raise_nofile()
    code = {**code_info(), **snapshot_sources(workdir)}
    bench = Bench(scale, workdir, log, do_profile=not args.no_profile)
    log(f"work dir {workdir} (server logs and databases); profiling {'on' if bench.do_profile else 'off'}")
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)  # type: ignore[union-attr]
    try:
        raw = await asyncio.wait_for(bench.run(), args.max_seconds)
    except BaseException:
        log(f"the run did not finish; its work dir {workdir} is kept (server logs, databases)")
        raise
    finally:
        log("stopping every process started")
        await bench.close()
    results: dict[str, Any] = {
        "date": t0.date().isoformat(),
        "started_at": t0.isoformat(timespec="seconds"),
        "mode": "quick" if scale.quick else "full",
        "duration_s": round(time.monotonic() - started, 1),
        "machine": machine(workdir, nofile),
        "code": {**code, "git_commit_at_end": code_info()["git_commit"]},
        **raw,
    }
    write_outputs(results, log)
    if not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="counts down 10x: a ~1 minute smoke run")
    parser.add_argument("--no-profile", action="store_true", help="skip py-spy re-runs for missed targets")
    parser.add_argument("--tmpdir", default=None, help="where the temporary databases go (default: the system's)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep server logs, databases and raw profiles")
    parser.add_argument("--max-seconds", type=float, default=None, help="abort the run after this long")
    parser.add_argument(
        "--report", metavar="JSON", help="measure nothing: redo targets, notes, table and chart from a results file"
    )
    args = parser.parse_args()
    if args.max_seconds is None:
        args.max_seconds = 300.0 if args.quick else 1200.0
    _check_deps()
    if args.report:
        import json

        write_outputs(json.loads(Path(args.report).read_text()), lambda msg: print(msg, file=sys.stderr))
        return 0
    try:
        return asyncio.run(_run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    except TimeoutError:
        print(f"bench: stopped after --max-seconds {args.max_seconds:g}; every process it started was stopped", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
