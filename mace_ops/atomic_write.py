"""Write a file whole or not at all: bytes to a temporary file in the target's folder, synced,
then renamed over the target (``os.replace`` is atomic on one file system). A crash or an error
mid-write leaves the old file (or none), never a half-written one, and the temporary file is
removed. The new file gets the normal permissions of a new file (0666 minus the umask), not
mkstemp's 0600."""
from __future__ import annotations

import os
import tempfile


def write_bytes_atomic(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".mace-", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
