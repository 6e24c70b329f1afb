"""Owner-only files and folders: what tokensaver writes is derived from prompts, so it is 0600 in 0700.

Modes are set when a file or folder is created and then fixed with ``chmod`` (a umask can only
remove bits, and a strict one would leave an owner-only file unwritable), so the result does not
depend on the umask. Existing files tokensaver writes again are tightened before anything goes in.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("tokensaver.files")

FILE_MODE = 0o600
DIR_MODE = 0o700


def _owned(st: os.stat_result) -> bool:
    return not hasattr(os, "getuid") or st.st_uid == os.getuid()


def private_dir(path: str | Path, *, tighten: Callable[[Path], bool] | None = None) -> Path:
    """Create ``path`` and its missing parents as 0700 folders; return it.

    A folder that already exists is left as it is, unless ``tighten(path)`` says it is tokensaver's
    own: then it is made 0700 when it is ours and open to others.
    """
    p = Path(path)
    missing = []
    q = p
    while not q.exists():
        missing.append(q)
        if q.parent == q:
            break
        q = q.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
        except FileExistsError:  # another process made it first: it is not ours to chmod
            continue
        os.chmod(d, DIR_MODE)
    if not missing and tighten is not None:
        st = p.stat()
        if stat.S_IMODE(st.st_mode) & 0o077 and _owned(st) and tighten(p):
            os.chmod(p, stat.S_IMODE(st.st_mode) & ~0o077)
    return p


def open_private(path: str | Path, flags: int) -> int:
    """``os.open(path, flags | O_CREAT)`` as a 0600 file; an existing regular file of ours is made 0600."""
    fd = os.open(path, flags | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
    try:
        st = os.fstat(fd)
        # only regular files of ours: never a terminal, a pipe or /dev/null given as -o
        if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != FILE_MODE and _owned(st):
            if hasattr(os, "fchmod"):
                os.fchmod(fd, FILE_MODE)
            else:  # pragma: no cover - Windows before 3.13
                os.chmod(path, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` as a 0600 file, its missing folders 0700."""
    p = Path(path)
    private_dir(p.parent)
    fd = open_private(p, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode("utf-8"))
