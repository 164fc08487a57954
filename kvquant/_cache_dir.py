"""Everything kvquant writes to disk for this machine goes through here: the user's
cache (XDG_CACHE_HOME, else ~/.cache, then kvquant/<kind>), or a root the user names.

The rules, because what is kept there is code (a C++ library, compiled torch graphs,
JAX executables) that later processes load:

- a directory is used only if this user owns it and nobody else can write to it (its
  parent either, unless sticky); kvquant creates directories with mode 0700. Anything
  else means no disk cache, with a one-line warning, never a shared temp directory;
- a file is loaded only if it is a regular file this user owns that nobody else can
  write to;
- files are written to a temporary name in the same directory, then renamed;
- kvquant deletes only directories it created, which hold its marker file
  (``MARKER``), never anything else under a root the user named.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
import warnings
from typing import Iterator, Optional

MARKER = ".kvquant-owned"
_WARNED: set = set()


def _uid() -> Optional[int]:
    return os.geteuid() if hasattr(os, "geteuid") else None  # no POSIX owners (Windows): ACLs decide


def warn_once(message: str) -> None:
    """A one-line RuntimeWarning, once per process and message."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def why_not_private(path: str, *, is_dir: bool = True) -> Optional[str]:
    """Why ``path`` may not hold code kvquant loads (None: it may)."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if is_dir and not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if not is_dir and not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    uid = _uid()
    if uid is not None and st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _parent_problem(path: str) -> Optional[str]:
    """A parent others could rename ``path`` in: writable by others and not sticky."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(parent)
    except OSError:
        return None
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        return f"its parent {parent} is writable by other users and not sticky"
    return None


def _make_private(path: str) -> None:
    """``path`` and any missing parents, each new one with mode 0700."""
    path = os.path.abspath(path)
    missing = []
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)


def private_dir(path: str, what: str) -> Optional[str]:
    """``path`` as a directory kvquant may keep ``what`` in (created, 0700, where
    missing), or None with a one-line warning saying why not."""
    try:
        _make_private(path)
    except OSError as e:
        reason = f"cannot be created ({e.strerror})"
    else:
        reason = why_not_private(path) or _parent_problem(path)
    if reason is None:
        return path
    warn_once(f"kvquant: not keeping {what} in {path}: it {reason}; nothing is saved to disk for it")
    return None


def user_cache_root() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvquant")


def cache_dir(kind: str) -> Optional[str]:
    """kvquant's private cache directory for ``kind`` (``cpu-kernel``, ``jax``,
    ``torch-graphs``), or None (with a warning) where it cannot be had safely."""
    root = private_dir(user_cache_root(), f"its {kind} cache")
    return None if root is None else private_dir(os.path.join(root, kind), f"its {kind} cache")


def loadable(path: str, what: str) -> bool:
    """Whether ``path`` is a file kvquant may load code from; a warning where it exists
    but may not."""
    if not os.path.exists(path):
        return False
    reason = why_not_private(path, is_dir=False)
    if reason is not None:
        warn_once(f"kvquant: not loading {what} from {path}: it {reason}")
    return reason is None


@contextlib.contextmanager
def atomic_path(path: str, shared: bool = False) -> Iterator[str]:
    """A temporary name beside ``path`` to write to; renamed onto ``path`` when the block
    ends without error, removed otherwise: readers see the old file or the whole new one.
    The file is this user's alone (0600), or with ``shared`` (a report the user asked
    for) readable as the umask allows a new file to be."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        yield tmp
        if shared:
            umask = os.umask(0o077)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_atomic(path: str, data: "bytes | str", shared: bool = False) -> None:
    with atomic_path(path, shared) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """An exclusive lock on the file ``path`` (created where missing) for the block:
    processes building the same thing take turns. No lock where the OS has no flock."""
    try:
        import fcntl
    except ImportError:  # Windows: builds race, and the atomic rename keeps them whole
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def owned_subdir(root: str, name: str) -> str:
    """``root/name``, created 0700 with kvquant's marker where missing: a directory
    ``prune_owned`` may later remove. An existing one is left as it is."""
    path = os.path.join(root, name)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return path
    write_atomic(os.path.join(path, MARKER), "made by kvquant, which may delete this directory\n")
    return path


def is_owned(path: str) -> bool:
    """Whether ``path`` is a directory (not a link) kvquant made: this user's, with the
    marker file inside."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    uid = _uid()
    return (stat.S_ISDIR(st.st_mode) and (uid is None or st.st_uid == uid)
            and why_not_private(os.path.join(path, MARKER), is_dir=False) is None)


def prune_owned(root: str, keep: int, pattern: str) -> None:
    """Remove all but the ``keep`` most recently used of the directories under ``root``
    whose names match ``pattern`` and that kvquant made (``is_owned``); nothing else."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    ours = [os.path.join(root, n) for n in names if re.fullmatch(pattern, n) and is_owned(os.path.join(root, n))]
    ours.sort(key=lambda p: os.lstat(p).st_mtime, reverse=True)
    for old in ours[keep:]:
        shutil.rmtree(old, ignore_errors=True)
