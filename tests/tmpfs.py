"""A real full filesystem for disk-full tests: mount a small tmpfs, fill it to ENOSPC.

Mounting needs root, as the dev box and CI run. A mount that fails fails the test: a disk-full
test that cannot get a disk never passes silently.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """`mnt` as a tmpfs of `size` (mount's syntax: "16m", bytes), unmounted on exit (lazily,
    and failing the test, if something still holds it)."""
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"could not mount a tmpfs at {mnt} (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)])
            pytest.fail(f"umount {mnt}: {r.stderr.strip()}")


def fill(path: Path) -> int:
    """Write zeros to `path` until the filesystem says ENOSPC; returns the file's size."""
    chunk = bytes(1 << 20)
    with path.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return path.stat().st_size


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
