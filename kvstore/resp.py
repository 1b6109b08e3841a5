"""Read RESP2 bulk replies (GET) straight from a socket into one buffer per value.

redis-py's pure-Python parser copies a 1.4 MB value about four times on its way out (recv
chunks -> BytesIO -> bytes -> slice); without hiredis that caps GET near 300 MB/s on the dev
box. Here the `$<len>` line goes through a small buffer and the value lands, with recv_into, in
a buffer the decoder can then view in place.

    $<len>\\r\\n<len bytes>\\r\\n     a value          $-1\\r\\n   a missing key
    -<message>\\r\\n                 an error reply (returned, not raised: one bad key is a miss)
"""

from __future__ import annotations

import socket

import torch
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

_RECV_BYTES = 65536  # first read per reply: the length line and often a small value whole
_MAX_LINE = 1024  # a reply line (length or error message) longer than this is garbage


class BulkReader:
    """Reads replies from one connection's socket; owns the bytes read past a reply's end."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()  # bytes received but not yet consumed

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _recv_more(self) -> None:
        try:
            chunk = self._sock.recv(_RECV_BYTES)
        except TimeoutError as exc:  # socket.timeout is TimeoutError since 3.10
            raise RedisTimeoutError("timeout reading from redis") from exc
        except OSError as exc:
            raise RedisConnectionError(f"error reading from redis: {exc}") from exc
        if not chunk:
            raise RedisConnectionError("redis closed the connection")
        self._buf += chunk

    def _readline(self) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            if len(self._buf) > _MAX_LINE:
                raise RedisConnectionError("malformed reply from redis")
            self._recv_more()
        line = bytes(self._buf[:end])
        del self._buf[:end + 2]
        return line

    def read_bulk(self) -> memoryview | ResponseError | None:
        """One GET reply: the value (a writable view nobody else holds), None, or the error."""
        line = self._readline()
        if line == b"_":  # RESP3 null, should a server or proxy answer in RESP3
            return None
        if line[:1] == b"-":
            return ResponseError(line[1:].decode("utf-8", "replace"))
        if line[:1] != b"$" or not line[1:].lstrip(b"-").isdigit():
            raise RedisConnectionError(f"unexpected reply from redis: {line[:40]!r}")
        size = int(line[1:])
        if size < 0:
            return None
        return self._read_exact(size + 2)[:size]  # +2: the value's trailing \r\n

    def _read_exact(self, size: int) -> memoryview:
        # torch.empty, not bytearray: no zero-fill of a buffer we are about to overwrite.
        out = memoryview(torch.empty(size, dtype=torch.uint8).numpy())
        have = min(size, len(self._buf))
        out[:have] = self._buf[:have]
        del self._buf[:have]
        try:
            while have < size:
                got = self._sock.recv_into(out[have:])
                if not got:
                    raise RedisConnectionError("redis closed the connection")
                have += got
        except TimeoutError as exc:
            raise RedisTimeoutError("timeout reading from redis") from exc
        except OSError as exc:
            raise RedisConnectionError(f"error reading from redis: {exc}") from exc
        return out
