"""Files written all at once or not at all, with their sha256, and disk errors that say what to do.

Used for checkpoint shards (`dist_mha.checkpoint.shards`) and for the
training app's manifests, pointers and lock (`dist_mha.train`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path


class _HashingWriter:
    """A file object that hashes what is written through it (torch.save calls write and flush)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data):
        self.sha.update(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def _write_error(path: Path, err: OSError) -> OSError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    what = {errno.ENOSPC: "the filesystem is full", errno.EDQUOT: "the disk quota is exhausted",
            errno.EFBIG: "the file would exceed this process's file-size limit (ulimit -f)"}.get(err.errno)
    cause = f"{err.strerror or err}" + (f": {what}" if what else "")
    return OSError(err.errno, (
        f"Could not write {path} ({cause}; {free} in {path.parent}). The partly written temporary file was "
        "removed and nothing else was changed. Free some space (or raise the limit), or write to another "
        "directory, then retry."))


def atomic_write(path, write) -> str:
    """Writes `path` all at once or not at all; returns the sha256 (hex) of the bytes written.

    `write(f)` writes the content to the binary file object `f`. The bytes go
    to `path.tmp<pid>` in the same directory, are fsynced and renamed over
    `path` (then the directory is fsynced), so readers see the old file or the
    complete new one. On any failure the temporary file is removed.

    Raises:
        OSError: naming `path`, the cause and the free space, when the
            filesystem refuses the write (full disk, quota, file-size limit).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            w = _HashingWriter(f)
            write(w)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno is not None:
            raise _write_error(path, e) from e
        raise
    fsync_dir(path.parent)
    return w.sha.hexdigest()


def sha256_file(path, chunk: int = 1 << 22) -> str:
    """The sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
