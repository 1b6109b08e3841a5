"""Directory tier: one file per blob, capped in bytes with LRU eviction, shared by processes.

    <dir>/                       0700: blocks are activations of users' prompts
    <dir>/<quoted key>.kv        a complete blob (codec.py), 0600; mtime = last use, ns
    <dir>/.tmp-<pid>-<rand>      a blob being written (0600 from creation); renamed into place

- Atomic writes: write a temp file, then rename. A reader sees the old file, no file (a miss)
  or the new one, never a torn one. No fsync: after a power loss a short or garbled file
  fails the checksum (or MAC) and is a miss, which is all a cache needs.
- LRU survives restarts: every use stamps the file's mtime (strictly increasing in a process)
  and start-up re-indexes the directory oldest-first.
- Several processes may share the directory. The in-memory index is only this process's view:
  files of other processes are picked up when seen and on a rescan, files that vanish under us
  are misses, and each process evicts its least recently used files to keep the whole
  directory under the cap (LRU order across processes is approximate between rescans).
- The cap holds across processes: each one rescans (a scandir: the true total, and every
  process's files in mtime order, so the oldest of any process go first) after every
  cap/RESCAN_FRACTION bytes it writes, and every rescan_s. The process that rescanned last
  keeps its view under the cap, and each other one wrote less than cap/RESCAN_FRACTION since
  its own earlier rescan, so N processes overshoot by at most (N-1) * cap/RESCAN_FRACTION plus
  a block in flight. A rescan stats ~cap/block files, spread over cap/RESCAN_FRACTION bytes of
  puts: RESCAN_FRACTION stats per put. (A shared byte counter would be exact, but needs a lock
  file and repair after crashes; a recount cannot drift.)
- Disk full (ENOSPC, EDQUOT) during a put: rescan, evict the oldest files of any process until
  the blob fits, retry once, and hold the cap at what fitted for rescan_s. Meanwhile each put
  evicts before it writes, so its block fits in space already freed (disk_space.py): one
  ENOSPC per process per rescan_s while the disk stays full, not one per put. Only a failed
  retry, or any other OSError (permission, read-only), marks the tier down (breaker.py).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, unquote

from kvstore.breaker import Breaker
from kvstore.codec import Blob
from kvstore.disk_space import DiskSpace

log = logging.getLogger(__name__)

SUFFIX = ".kv"
TMP_PREFIX = ".tmp-"
STALE_TMP_S = 600.0  # a temp file this old belongs to a writer that died; reap it on rescan
DIR_MODE = 0o700  # whoever can read the folder reads prompts' KV; whoever can write it plants it
FILE_MODE = 0o600
# Rescan after every cap/16 bytes written: 16 stats per put amortized, and each other process
# sharing the folder can overshoot the cap by at most 1/16 of it between rescans.
RESCAN_FRACTION = 16
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def map_file(fd: int) -> memoryview:
    """The file's bytes, mapped copy-on-write rather than read into a new buffer.

    A read costs fresh memory for every byte (a VM faults it in at ~1 ms per MB, and far more
    while other processes hold most of the host's memory: docs/BENCHMARKS.md, "Store block
    size and the after-restart TTFT"); a private mapping of a file in the page cache only maps
    the cached pages, 16 per fault. It is writable (decode may view it, as it viewed a read
    buffer) and a write copies just that page. Safe because a block's file is never truncated
    or rewritten in place: writers rename a new file over it (a shorter file under a live
    mapping would fault the process with SIGBUS) and eviction unlinks it, which a mapping
    outlives. Callers must not keep a mapping per block for long (TieredStore copies one it
    promotes into memory): a process has ~65k mappings (vm.max_map_count).
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return memoryview(bytearray())  # the codec reports it as corrupt
    return memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_COPY))


class DiskTier:
    name = "disk"
    verify = True
    retains = False
    maps = True

    def __init__(self, path: str | os.PathLike, capacity_bytes: int, breaker: Breaker,
                 rescan_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path).expanduser()
        self.capacity_bytes = capacity_bytes
        self.breaker = breaker
        self._rescan_s = rescan_s
        self._clock = clock
        self._lock = threading.Lock()
        self._space = DiskSpace(capacity_bytes)  # the index, the cap and what to evict
        self._stamp_ns = 0
        self._last_scan = clock()
        self._written = 0  # bytes this process wrote since its last rescan
        try:
            self._ensure_dir()
            self.rescan()
        except OSError as exc:
            breaker.failed(exc)

    @property
    def up(self) -> bool:
        return self.breaker.up

    def _ensure_dir(self) -> None:
        """Make the directory 0700; tighten one we own that is open wider, warn about one that
        another user owns (we cannot fix it)."""
        self.path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        st = self.path.stat()
        mode = stat.S_IMODE(st.st_mode)
        if not mode & 0o077:
            return
        if st.st_uid == os.getuid():
            os.chmod(self.path, DIR_MODE)
            log.warning("kvstore disk: %s was mode %o; tightened to %o", self.path, mode,
                        DIR_MODE)
        else:
            log.warning("kvstore disk: %s is mode %o and owned by uid %d: other users can read "
                        "or plant blocks", self.path, mode, st.st_uid)

    def _file(self, key: str) -> Path:
        return self.path / (quote(key, safe="@-_.") + SUFFIX)

    def keys_lru(self) -> list[str]:
        with self._lock:
            return list(self._space.index)

    # --- index -------------------------------------------------------------------------------

    def _next_stamp(self) -> int:
        """A wall-clock ns stamp greater than any before it, so mtime order is use order even
        when the filesystem clock is coarser than our calls."""
        with self._lock:
            self._stamp_ns = max(time.time_ns(), self._stamp_ns + 1)
            return self._stamp_ns

    def _note(self, key: str, nbytes: int) -> list[str]:
        """Record a use of `key` (now nbytes on disk); returns the keys to evict."""
        with self._lock:
            return self._space.note(key, nbytes)

    def _forget(self, key: str) -> None:
        with self._lock:
            self._space.forget(key)

    def _unlink(self, keys: list[str]) -> int:
        """Remove the keys' files; returns how many were there (another process may have
        evicted the others)."""
        removed = 0
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                self._file(key).unlink()
                removed += 1
        return removed

    def rescan(self) -> None:
        """Rebuild the index from the directory, oldest mtime first, then enforce the cap."""
        found = []
        now = time.time()
        with os.scandir(self.path) as it:
            for entry in it:
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                if entry.name.startswith(TMP_PREFIX) and now - st.st_mtime > STALE_TMP_S:
                    Path(entry.path).unlink(missing_ok=True)
                elif entry.name.endswith(SUFFIX):
                    found.append((st.st_mtime_ns, entry.name, st.st_size))
        found.sort()
        with self._lock:
            self._stamp_ns = max([self._stamp_ns] + [m for m, _, _ in found])
            self._last_scan = self._clock()
            self._written = 0
            victims = self._space.reload(
                [(unquote(n[:-len(SUFFIX)]), s) for _, n, s in found], self._last_scan)
        self._unlink(victims)

    # --- tier interface ----------------------------------------------------------------------

    def contains(self, keys: list[str]) -> list[bool]:
        if not self.breaker.allow():
            return [False] * len(keys)
        out = []
        try:
            for key in keys:
                out.append(self._stat_known(key))
        except OSError as exc:
            self.breaker.failed(exc)
            return out + [False] * (len(keys) - len(out))
        self.breaker.succeeded()
        return out

    def _stat_known(self, key: str) -> bool:
        """Whether the file exists; syncs the index with what other processes did."""
        try:
            size = self._file(key).stat().st_size
        except FileNotFoundError:
            self._forget(key)
            return False
        with self._lock:
            known = key in self._space.index
        if not known:
            self._unlink(self._note(key, size))
        return True

    def get_many(self, keys: list[str]) -> list[Blob | None]:
        if not self.breaker.allow():
            return [None] * len(keys)
        out: list[Blob | None] = []
        try:
            for key in keys:
                out.append(self._read(key))
        except OSError as exc:
            self.breaker.failed(exc)
            return out + [None] * (len(keys) - len(out))
        self.breaker.succeeded()
        return out

    def _read(self, key: str) -> memoryview | None:
        path = self._file(key)
        try:
            with open(path, "rb", buffering=0) as f:
                buf = map_file(f.fileno())
        except FileNotFoundError:
            self._forget(key)
            return None
        stamp = self._next_stamp()
        # FileNotFoundError: evicted by another process since; the bytes we hold are whole.
        with contextlib.suppress(FileNotFoundError):
            os.utime(path, ns=(stamp, stamp))
        self._unlink(self._note(key, buf.nbytes))
        return buf

    def put_many(self, blobs: dict[str, Blob], ttl_s: float | None = None) -> int:
        """ttl_s is not used here: a blob's expiry is in its header and checked on decode."""
        if not self.breaker.allow():
            return 0
        stored = 0
        try:
            for key, blob in blobs.items():
                nbytes = memoryview(blob).nbytes
                if nbytes > self.capacity_bytes:
                    continue
                self._put_one(key, blob, nbytes)
                stored += nbytes
        except OSError as exc:
            self.breaker.failed(exc)
            return stored
        self.breaker.succeeded()
        return stored

    def _put_one(self, key: str, blob: Blob, nbytes: int) -> None:
        with self._lock:
            self._space.begin(nbytes)
        try:
            self._reserve()
            self._write_or_make_room(self._file(key), blob)
            self._account(key, nbytes)
        finally:
            with self._lock:
                self._space.end(nbytes)

    def _write_or_make_room(self, path: Path, blob: Blob) -> None:
        try:
            self._write(path, blob)
        except OSError as exc:
            if exc.errno not in FULL_ERRNOS or not self._make_room():
                raise
            log.warning("kvstore disk %s is full (%s): evicted the oldest blocks; retrying",
                        self.path, exc)
            self._write(path, blob)  # once: if this fails too, the breaker counts it

    def _account(self, key: str, nbytes: int) -> None:
        """Index the new file, and rescan when this process wrote enough, or long enough ago."""
        with self._lock:
            self._written += nbytes
            due = (self._written >= self.capacity_bytes // RESCAN_FRACTION
                   or self._clock() - self._last_scan > self._rescan_s)
        if due:
            self.rescan()  # indexes the new file too, with every other process's
        else:
            self._unlink(self._note(key, nbytes))

    def _reserve(self) -> None:
        """While the disk is full (the cap lowered), evict the oldest files before writing,
        until the blocks in flight fit under the cap: the disk has no room for them until
        those files go."""
        while True:
            with self._lock:
                victims = self._space.reserve(self._clock())
            gone = sum(size for key, size in victims if not self._unlink([key]))
            if not gone:
                return
            with self._lock:  # those freed nothing: evict further
                self._space.unseen(gone)

    def _make_room(self) -> bool:
        """The disk is full: evict the oldest files (of every process: rescan first) until
        the blocks in flight fit, and hold the cap at what fitted for rescan_s, so that later
        puts evict before they write instead of failing. False if there was nothing to
        evict."""
        self.rescan()
        with self._lock:
            victims = self._space.lower(self._clock() + self._rescan_s)
        self._unlink(victims)
        return bool(victims)

    def _write(self, path: Path, blob: Blob) -> None:
        tmp = self.path / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        try:
            with self._open_tmp(tmp) as f:
                f.write(blob)
                f.flush()
                stamp = self._next_stamp()
                os.utime(f.fileno(), ns=(stamp, stamp))
            # Unlink first: ext4 (auto_da_alloc) forces writeback when a rename replaces a
            # file, 2.5 ms instead of 0.5 ms per 1.47 MB block. Readers meanwhile see a miss.
            path.unlink(missing_ok=True)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _open_tmp(self, tmp: Path) -> BinaryIO:
        """A new file (O_EXCL), 0600 from its creation (less any umask): the mode is right
        before the first byte is written, and the rename keeps it."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(tmp, flags, FILE_MODE)
        except FileNotFoundError:  # the directory was never made (start-up fault) or removed
            self._ensure_dir()
            fd = os.open(tmp, flags, FILE_MODE)
        return os.fdopen(fd, "wb")  # the caller's with closes it

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._forget(key)
        try:
            self._unlink(keys)
        except OSError as exc:
            self.breaker.failed(exc)

    def close(self) -> None:
        """Nothing to release: the files are the state, and they outlive the process."""

    def stats(self) -> dict:
        with self._lock:
            return {"up": self.breaker.up, **self._space.stats(),
                    "errors": self.breaker.failures}
