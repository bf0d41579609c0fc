"""What the jobs of a sweep in one process share: values made once per key, a few at a time."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(Generic[K, V]):
    """Values remembered by key; past `size` the oldest is forgotten before a new one is made.

    Forgetting first keeps at most `size` alive at once: the values can be large (a data set,
    a model), and a memo of size 1 never holds two.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a memo holds at least one value, not {size}")
        self._size = size
        self._values: dict[K, V] = {}

    def get(self, key: K, make: Callable[[], V]) -> V:
        """The value of `key`, made by `make()` the first time."""
        if key not in self._values:
            self.put(key, make)
        return self._values[key]

    def peek(self, key: K) -> V | None:
        """The value of `key` if remembered, else None."""
        return self._values.get(key)

    def put(self, key: K, make: Callable[[], V]) -> V:
        """Remember `make()` as the value of `key`, in place of any earlier one."""
        self._values.pop(key, None)
        while len(self._values) >= self._size:
            self._values.pop(next(iter(self._values)))  # the oldest
        self._values[key] = value = make()
        return value

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        """Forget every value."""
        self._values.clear()
