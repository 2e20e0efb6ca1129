"""The part budget of stored values: one budget for all the values of one call, and a budget that
keeps real tables storable while a value that only grows when written out is refused at once."""

from __future__ import annotations

import time

import pytest

from sharedstate._values import MAX_PARTS, PartBudget, check_value


def _block(rows: int, width: int) -> list:
    """``rows`` references to one list of ``width`` ints: 1 + rows * (1 + width) parts written out,
    about ``rows`` pointers in memory."""
    row = list(range(width))
    return [row] * rows


def test_one_update_shares_one_part_budget_across_its_values(any_state):
    big = _block(1000, 999)  # 1,000,001 parts; small in memory and when pickled (pickle memoizes the row)
    names = MAX_PARTS // 1_000_001 + 1
    any_state.set("before", 1)
    any_state.update({"a": big, "b": big})  # well inside the budget together
    assert any_state.get("b") == big
    with pytest.raises(ValueError, match="the values of this call have more than .* parts when written out"):
        # Each value alone is far inside the budget; together a save would write more than the budget.
        any_state.update({f"k{i}": big for i in range(names)})
    assert not any(any_state.contains(f"k{i}") for i in range(names))
    assert sorted(any_state.names()) == ["a", "b", "before"]


def test_a_shared_budget_counts_a_container_under_each_name_that_holds_it():
    big = _block(1000, 999)
    budget = PartBudget()
    for i in range(MAX_PARTS // 1_000_001):
        check_value(f"k{i}", big, budget)
    assert budget.used == (MAX_PARTS // 1_000_001) * 1_000_001
    with pytest.raises(ValueError, match=rf"'last': the values of this call have more than {MAX_PARTS:,} parts"):
        check_value("last", big, budget)
    check_value("alone", big)  # without a shared budget each value has its own


def test_the_budget_is_exact_at_its_bound():
    row = list(range(999))
    at_bound = [row] * (MAX_PARTS // 1000 - 1) + [0] * 999  # 1 + (n - 1) * 1000 + 999 parts
    check_value("v", at_bound)
    with pytest.raises(ValueError, match=f"'v': the value has more than {MAX_PARTS:,} parts when written out"):
        check_value("v", at_bound + [0])


def test_a_table_of_a_million_rows_of_nine_ints_is_checked_and_stored(state):
    table = [list(range(i, i + 9)) for i in range(1_000_000)]  # 10,000,001 parts
    check_value("table", table)
    state.set("table", table)
    stored = state.get("table")
    assert len(stored) == 1_000_000 and stored[-1] == table[-1]


@pytest.mark.timeout(60)
def test_a_value_that_doubles_at_each_level_is_refused_at_once_in_a_shared_budget():
    doubling: list = []
    for _ in range(40):
        doubling = [doubling, doubling]
    budget = PartBudget()
    started = time.monotonic()
    check_value("small", [1, 2, 3], budget)
    with pytest.raises(ValueError, match="'x': the values of this call have more than"):
        check_value("x", doubling, budget)
    assert time.monotonic() - started < 5  # counted with the memo, never by walking 2**41 parts
