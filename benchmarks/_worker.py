"""What the benchmark scripts share: a measured configuration runs in a fresh child process."""

from __future__ import annotations

import subprocess
import sys
from typing import Callable


def peak_rss_mb() -> float:
    """Peak resident set of this process in MiB.

    VmHWM rather than ru_maxrss: Linux carries ru_maxrss over fork and exec, so a worker
    spawned by a parent that has just written a 4 GB region would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def run_in_child(script: str, arguments: list[str]) -> int:
    """Run ``script`` again with ``arguments`` in a fresh process and print the last line it prints (its JSON)."""
    child = subprocess.run([sys.executable, script, *arguments], stdout=subprocess.PIPE, text=True, check=False)
    if child.returncode != 0:
        if child.returncode != 2:  # 2: the worker has printed its one-line error already
            print(f"benchmark worker failed with exit code {child.returncode}", file=sys.stderr)
        return child.returncode
    print(child.stdout.strip().splitlines()[-1])
    return 0


def run_main(main: Callable[[], int | None]) -> None:
    """Run a benchmark's ``main()`` as the gigaseg commands run: bad input is one line ``error: ...``, status 2."""
    from gigaseg.cli.common import user_errors

    with user_errors():
        sys.exit(main())
