"""gigaseg: end-to-end deep learning on gigapixel pathology images."""

import os
import sys
from pathlib import Path

__version__ = "0.1.0"


def user_cache_dir() -> Path:
    """This user's cache folder for gigaseg (``$XDG_CACHE_HOME/gigaseg``, ``~/Library/Caches/gigaseg`` on macOS)."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "gigaseg"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gigaseg"


# The compiled kernels (cache=True) would otherwise be written beside their sources, into
# the installed package; numba reads this when it is first imported, which comes later.
os.environ.setdefault("NUMBA_CACHE_DIR", str(user_cache_dir() / "numba"))
