"""Where kvquant keeps what it compiles or builds for this machine: the user's cache
directory (XDG_CACHE_HOME, else ~/.cache), one folder per kind under kvquant/."""
from __future__ import annotations

import os


def user_cache_dir(kind: str) -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvquant", kind)
