"""Evenly spaced subsets, the same on every run: the questions a bounded measurement asks, the sample
answers a report shows. QA pairs come five per person, so the first few would all be about one person."""

from __future__ import annotations


def spread_sample(results: list, count: int) -> list:
    """`count` items evenly spaced over `results` (all of them when there are no more than `count`)."""
    if count <= 0 or not results:
        return []
    if count >= len(results):
        return list(results)
    return [results[index * len(results) // count] for index in range(count)]
