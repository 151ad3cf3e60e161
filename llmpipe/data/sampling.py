"""Subsets that are the same on every run: the questions a bounded measurement asks, the sample answers a
report shows.

- `spread_sample`: evenly spaced items (sample answers in reports).
- `first_items`: the first items of a file (the questions a bounded QA measurement asks). Not spread:
  the QA files list five questions per person, one per attribute, people in random order, so evenly spaced
  questions alias on that period (every 5th question of 500 is always the same attribute) while the first N
  are N / 5 random people with every attribute asked.
"""

from __future__ import annotations


def spread_sample(results: list, count: int) -> list:
    """`count` items evenly spaced over `results` (all of them when there are no more than `count`)."""
    if count <= 0 or not results:
        return []
    if count >= len(results):
        return list(results)
    return [results[index * len(results) // count] for index in range(count)]


def first_items(items: list, count: int | None) -> list:
    """The first `count` items (all of them when `count` is None or at least their number)."""
    return list(items) if count is None else list(items[:count])
