"""The MLflow project's launcher: ``python -m gigaseg.cli.project ENTRY "OVERRIDES"``.

MLflow passes ``-P overrides="a=1 b=2"`` as one quoted argument; this splits it the way a
shell would and hands the pieces to the Hydra app, so overrides reach Hydra verbatim.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

APPS = {"prepare": "gigaseg.cli.prepare", "train": "gigaseg.cli.train", "predict": "gigaseg.cli.predict",
        "evaluate": "gigaseg.cli.evaluate", "export": "gigaseg.cli.export", "view": "gigaseg.cli.view"}
PIPELINES = {"main": ("prepare", "train"), **{name: (name,) for name in APPS}}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in PIPELINES:
        print(f"usage: python -m gigaseg.cli.project {{{','.join(PIPELINES)}}} [OVERRIDES]", file=sys.stderr)
        return 2
    overrides: list[str] = []
    for text in argv[1:]:
        overrides.extend(shlex.split(text))
    for app in PIPELINES[argv[0]]:
        code = subprocess.call([sys.executable, "-m", APPS[app], *overrides])
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
