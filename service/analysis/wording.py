"""Counts said in words a reader meets (flag messages, CLI lines): "1 whole red cell", "2 whole red cells"."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`n` and `noun`, singular for one, else `plural` (the noun with an s by default)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
