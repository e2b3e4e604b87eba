"""The Pareto front of search candidates: no other candidate is at least as good on every
objective and better on one. Pure functions over plain numbers."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["dominates", "pareto_front"]


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether ``a`` dominates ``b``; every objective is to be *minimised*."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True)
    )


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points (objectives minimised), in input order.

    Identical points are all kept: neither dominates the other.
    """
    return [
        i
        for i, point in enumerate(points)
        if not any(dominates(other, point) for j, other in enumerate(points) if j != i)
    ]
