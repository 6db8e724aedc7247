"""Run a command as its own process and measure it: exit status, peak resident memory, wall time.

Peak RSS comes from GNU ``/usr/bin/time -v`` ("Maximum resident set size": the largest single
process of the command's tree), or, without it, from ``getrusage(RUSAGE_CHILDREN)`` in a fresh
Python parent that runs only this command.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_RUSAGE_PARENT = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r)"
)


def run_measured(
    command: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """``returncode``, ``peak_rss_bytes`` (None if unreadable), ``wall_seconds``, ``stderr``, ``tool``."""
    start = time.perf_counter()
    if Path("/usr/bin/time").is_file():
        proc = subprocess.run(
            ["/usr/bin/time", "-v", *command], capture_output=True, text=True, cwd=cwd, env=env
        )
        found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        kbytes, tool = (int(found.group(1)) if found else None), "/usr/bin/time -v"
    else:
        proc = subprocess.run([sys.executable, "-c", _RUSAGE_PARENT, *command], capture_output=True, text=True,
                              cwd=cwd, env=env)  # fmt: skip
        last = proc.stderr.strip().splitlines()[-1:]
        kbytes = int(last[0]) if last and last[0].isdigit() else None
        tool = "getrusage(RUSAGE_CHILDREN)"
    return {
        "returncode": proc.returncode,
        "peak_rss_bytes": kbytes * 1024 if kbytes is not None else None,
        "wall_seconds": time.perf_counter() - start,
        "stderr": proc.stderr,
        "tool": tool,
    }
