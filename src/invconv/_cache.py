"""One bounded, thread-safe LRU cache, used wherever a call reuses work.

A :class:`BoundedCache` holds at most ``max_entries`` values and at most
``max_bytes`` bytes of them (each value's size is given when it is stored);
a value larger than a quarter of the byte bound is returned to its caller but
never stored, so one huge entry cannot push the cache past its bound or
flush everything else.  Values are built outside the lock (two threads may
build the same value once each; the first stored wins), so a slow build
never blocks other keys.  Stored values must be immutable: NumPy arrays are
made read-only by :func:`frozen`.
"""
from __future__ import annotations

import collections
import threading

__all__ = ["BoundedCache", "frozen"]


def frozen(*arrays):
    """Mark NumPy arrays read-only (a cached array must never be written)."""
    for a in arrays:
        a.flags.writeable = False
    return arrays[0] if len(arrays) == 1 else arrays


class BoundedCache:
    def __init__(self, max_entries: int, max_bytes: int):
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("a cache needs room for at least one entry and one byte")
        self.max_entries, self.max_bytes = int(max_entries), int(max_bytes)
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key):
        """The value stored under ``key`` (now the most recently used), or None."""
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key, value, nbytes: int):
        """Store ``value`` (``nbytes`` large) unless it is too large; return
        the value stored under ``key`` (an earlier one wins a race)."""
        if nbytes > self.max_bytes // 4:
            return value
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit[0]
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, old) = self._items.popitem(last=False)
                self._bytes -= old
            return value

    def get_or_build(self, key, build, nbytes_of):
        """``get(key)``, else ``put(key, build(), nbytes_of(value))``."""
        value = self.get(key)
        if value is None:
            value = build()
            value = self.put(key, value, nbytes_of(value))
        return value

    def clear(self):
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
