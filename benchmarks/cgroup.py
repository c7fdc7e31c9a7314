"""Run a command as on a memory-starved device: a memory cgroup (v1; page cache counted) and cold caches.

    python -m benchmarks.cgroup --limit 200MiB -- python -c "x = bytearray(300 * 2**20)"

Needs root and /sys/fs/cgroup/memory (cgroup v1, as on these machines); `available()` says why not.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from d2moe.util.sizes import parse_size

MEMORY_ROOT = Path("/sys/fs/cgroup/memory")


def available() -> str | None:
    """None if limited runs are possible here, else the reason."""
    if os.geteuid() != 0:
        return "not root"
    if not (MEMORY_ROOT / "memory.limit_in_bytes").is_file():
        return "no cgroup v1 memory controller at /sys/fs/cgroup/memory"
    return None


def drop_caches() -> None:
    """Every engine starts cold: nothing of the model in the page cache."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@dataclass(frozen=True)
class LimitedRun:
    returncode: int
    killed_for_memory: bool
    seconds: float
    peak_bytes: int  # memory.max_usage_in_bytes: RSS + page cache of the cgroup
    stdout: str
    stderr: str


def run_limited(cmd: list[str], limit: int, name: str = "run", cold: bool = True, cwd: str | None = None,
                timeout: float = 1800) -> LimitedRun:
    """Run `cmd` inside a fresh memory cgroup of `limit` bytes (from its first instruction)."""
    why = available()
    if why:
        raise RuntimeError(f"cannot limit memory: {why}")
    group = MEMORY_ROOT / f"d2moe-bench-{name}-{os.getpid()}"
    group.mkdir(exist_ok=True)
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        if (group / "memory.swappiness").exists():
            (group / "memory.swappiness").write_text("0")
        if cold:
            drop_caches()
        procs = str(group / "cgroup.procs")

        def enter() -> None:  # runs in the child before exec
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=enter, cwd=cwd, timeout=timeout)
        seconds = time.perf_counter() - t0
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        oom = "oom_kill 1" in (group / "memory.oom_control").read_text() or p.returncode in (-9, 137)
        return LimitedRun(p.returncode, oom, seconds, peak, p.stdout, p.stderr)
    finally:
        for pid in (group / "cgroup.procs").read_text().split() if group.exists() else []:
            (MEMORY_ROOT / "cgroup.procs").write_text(pid)
        try:
            group.rmdir()
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", required=True, help="e.g. 200MiB")
    ap.add_argument("--warm", action="store_true", help="keep the page cache")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    r = run_limited(cmd, parse_size(args.limit), cold=not args.warm)
    sys.stdout.write(r.stdout)
    print(f"exit {r.returncode}, killed for memory: {r.killed_for_memory}, {r.seconds:.1f}s, "
          f"peak {r.peak_bytes / 2**20:.1f} MiB", file=sys.stderr)
    return 0 if r.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
