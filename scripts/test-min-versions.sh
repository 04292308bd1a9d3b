#!/usr/bin/env bash
# Install every dependency at the floor pyproject.toml gives it and run the default test suite,
# so that the floors stay true.
#
#   scripts/test-min-versions.sh [VENV]    # VENV: a new folder for the virtualenv (default: a temp folder)
#
# The floors are read from pyproject.toml (dependencies and the test extras) and written as a
# pip constraints file of exact pins, so they are written down in one place only; packages
# they pull in resolve to their newest compatible versions. Needs Python 3.11+ as python3
# (or PYTHON=...) and access to PyPI; takes a few minutes to install and about 8 to test on 2 cores.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
venv="${1:-$(mktemp -d "${TMPDIR:-/tmp}/gigaseg-min-versions.XXXXXX")/venv}"
if [[ -e "$venv" ]]; then
    echo "$venv already exists; give a new folder for the virtualenv" >&2
    exit 2
fi

"$python" -m venv "$venv"
floors="$venv/floors.txt"
"$venv/bin/python" - "$root/pyproject.toml" > "$floors" <<'EOF'
import re
import sys
import tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
requirements = project["dependencies"] + project["optional-dependencies"]["test"]
for requirement in requirements:
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group()
    floor = re.search(r">=\s*([^,;\s]+)", requirement)
    if floor is None:
        sys.exit(f"pyproject.toml: {requirement!r} has no floor (>=); give it one")
    print(f"{name}=={floor.group(1)}")
EOF
echo "floors ($floors):"
sed 's/^/  /' "$floors"

echo "installing into $venv (log: $venv/install.log)"
if ! { "$venv/bin/python" -m pip install --upgrade pip &&
       "$venv/bin/python" -m pip install -c "$floors" -e "$root[test]"; } > "$venv/install.log" 2>&1; then
    tail -n 30 "$venv/install.log" >&2
    echo "the floors do not install together: raise the one pip names in pyproject.toml" >&2
    exit 1
fi
"$venv/bin/python" -m pip freeze --exclude-editable > "$venv/installed.txt"
echo "installed versions: $venv/installed.txt"

# The tests run our console commands (gigaseg-train, ...) and dvc from PATH. Numba's cache of
# compiled kernels goes into the venv, so that other Numba versions do not share it.
export PATH="$venv/bin:$PATH" NUMBA_CACHE_DIR="$venv/numba-cache"
cd "$root"
"$venv/bin/python" -m pytest -q -p no:cacheprovider
