"""fallopt.memo.Memo: what a sweep's jobs in one process share, a few values at a time."""

from __future__ import annotations

from fallopt.memo import Memo


def test_a_value_is_made_once_and_the_oldest_is_forgotten_first():
    memo: Memo[str, int] = Memo(2)
    made: list[str] = []

    def make(key: str) -> int:
        made.append(key)
        return len(made)

    assert [memo.get(k, lambda k=k: make(k)) for k in ("a", "b", "a", "c", "b", "a")] == [
        1, 2, 1, 3, 2, 4,
    ]  # fmt: skip
    assert made == ["a", "b", "c", "a"]  # "a", the oldest, went when "c" came
    assert memo.peek("a") == 4 and memo.peek("b") is None and len(memo) == 2
    memo.clear()
    assert memo.peek("a") is None


def test_a_memo_of_one_never_holds_two_values():
    memo: Memo[str, list[int | None]] = Memo(1)
    memo.get("first", lambda: [1])
    held_while_making = []
    memo.get("second", lambda: held_while_making.append(memo.peek("first")) or [2])
    assert held_while_making == [None]  # the old data set is let go before the new one loads
    assert memo.put("second", lambda: [3]) == [3] and memo.peek("second") == [3]
