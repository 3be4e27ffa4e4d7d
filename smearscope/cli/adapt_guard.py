"""`adapt-wbc`'s check of the typed cells against the head: a consistent typing mistake.

The leave-one-out check compares the station means with the head on the technician's own types,
so it cannot see a mistake the technician makes every time (two classes swapped on every cell:
the means type each left-out cell "right", 100 %, and the station would then type every a as b).
A lab the head was not trained on makes the head disagree with the technician, mostly by being
unsure (its open-set tests send the cells to review) or by spreading its calls; it rarely makes
the head call most of one typed class one other class while passing its own open-set tests, and
almost never swaps two classes both ways. Either is refused unless a lab manager accepts it by
name (`--accept-disagreement TYPED->HEAD`), signing with their own (`--by`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

#: Share of one typed class the head confidently calls one single other class, from which the
#: typing is taken for a mistake (the head's open-set tests passed on each of those cells).
RELABELLED_SHARE = 0.4
#: Share of each of two typed classes the head confidently calls the other, from which the pair
#: is taken for swapped.
SWAPPED_SHARE = 0.3
#: Fewest typed cells of a class for its row to be judged by default (adapt-wbc judges the classes
#: that get a station mean: --min-cells; a class typed fewer times keeps the head's mean).
JUDGED_CELLS = 10
#: The column of the cells the head's open-set tests sent to review (no confident call).
UNSURE = "(review)"


@dataclass(frozen=True)
class Disagreement:
    """Typed class `typed`: `cells` of its `of` typed cells the head confidently calls `head`."""

    typed: str
    head: str
    cells: int
    of: int
    #: "relabelled" (one typed class called another), or "swapped" (two classes, each called the other)
    kind: str

    @property
    def key(self) -> str:
        return f"{self.typed}->{self.head}"

    def text(self) -> str:
        return f"{self.cells} of {self.of} cells typed {self.typed} the head calls {self.head}"


def confusion(types: Sequence[str], head_types: Sequence[str], confident: Sequence[bool]) -> dict[str, dict[str, int]]:
    """Per typed class, how many of its cells the head confidently called each class, and how many
    it sent to review (UNSURE)."""
    table: dict[str, Counter] = {}
    for t, h, ok in zip(types, head_types, confident):
        table.setdefault(t, Counter())[h if ok else UNSURE] += 1
    return {t: dict(sorted(c.items())) for t, c in sorted(table.items())}


def disagreements(table: dict[str, dict[str, int]], relabelled: float = RELABELLED_SHARE,
                  swapped: float = SWAPPED_SHARE, judged: int = JUDGED_CELLS) -> list[Disagreement]:
    """The typed classes the head contradicts as one consistent mistake would (see the module)."""
    n = {t: sum(row.values()) for t, row in table.items()}

    def share(t: str, h: str) -> float:
        return table.get(t, {}).get(h, 0) / n[t] if n.get(t, 0) >= judged else 0.0

    out: list[Disagreement] = []
    for t, row in table.items():
        for h, k in row.items():
            if h in (t, UNSURE):
                continue
            pair = share(t, h) >= swapped and share(h, t) >= swapped
            if pair or share(t, h) >= relabelled:
                out.append(Disagreement(t, h, k, n[t], "swapped" if pair else "relabelled"))
    return out


def table_text(table: dict[str, dict[str, int]]) -> list[str]:
    """The confusion table as lines (rows: the technician's types; columns: the head's confident
    calls, and the cells it sent to review)."""
    cols = sorted({h for row in table.values() for h in row if h != UNSURE}) + [UNSURE]
    corner = "typed \\ head"
    width = max([len(t) for t in table] + [len(corner)])
    lines = [f"{corner:<{width}}" + "".join(f" {c[:12]:>12}" for c in cols)]
    lines += [f"{t:<{width}}" + "".join(f" {row.get(c, 0):>12}" for c in cols) for t, row in table.items()]
    return lines


def acceptance_error(accepted: Sequence[str] | None, by: str | None) -> str | None:
    """Why --accept-disagreement and --by cannot go together as given (each needs the other; --by is
    a name signed as a verification's is); None where they can."""
    from smearscope.service.station.signed_name import signed_name_error

    if accepted and by is None:
        return ("--accept-disagreement needs --by NAME: who accepted it (the lab manager who checked those "
                "cells, as they sign), recorded in the station means file")
    if by is not None and not accepted:
        return "--by names who accepted a disagreement: give it with --accept-disagreement TYPED->HEAD"
    return None if by is None else signed_name_error(by, "--by")


def parse_accepted(values: Sequence[str] | None, classes: Sequence[str]) -> tuple[set[str], str | None]:
    """The accepted disagreements (`TYPED->HEAD`, classes of the head), or the reason one is malformed."""
    out: set[str] = set()
    for v in values or ():
        typed, sep, head = (s.strip().lower() for s in v.partition("->"))
        if not sep or typed not in classes or head not in classes or typed == head:
            return set(), (f"--accept-disagreement {v!r}: TYPED->HEAD with two of the WBC head's classes "
                           f"({', '.join(classes)}), e.g. neutrophil->lymphocyte")
        out.add(f"{typed}->{head}")
    return out, None
