"""Whether two name globs (fnmatch's, case-sensitive, as `match.name` is read) can name one AMI, and
whether one names every AMI the other does.

Each glob is read as fnmatch reads it: `*`, or one position (a character, `?`, a bracket). A bracket is
judged by fnmatch's own translation of it, on representative characters: every character the two globs
hold (a range's ends are among them) and one character of each gap between those. A bracket accepts
all of a gap or none of it, so two positions share a character exactly when they share a
representative.
"""

import fnmatch
import functools
import itertools
import re
from collections.abc import Callable, Iterator

from ami_janitor.core.policy import AMI_NAME_CHARACTERS, AMI_NAME_LENGTH


def _positions(pattern: str) -> Iterator[str | None]:
    """The glob's positions: None for `*` (a run of them is one), else the text of one position."""
    i, n = 0, len(pattern)
    star = False
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            if not star:
                yield None
            star = True
            continue
        star = False
        if c != "[":
            yield c
            continue
        j = i  # the closing bracket, found as fnmatch finds it
        if j < n and pattern[j] == "!":
            j += 1
        if j < n and pattern[j] == "]":
            j += 1
        while j < n and pattern[j] != "]":
            j += 1
        if j >= n:  # unclosed: a literal `[`
            yield "["
            continue
        yield pattern[i - 1 : j + 1]
        i = j + 1


def _representatives(*patterns: str) -> list[str]:
    points = sorted({ord(c) for pattern in patterns for c in pattern} | {0x10FFFF})
    chosen = {0}
    for low, high in itertools.pairwise(points):
        chosen.add(low)
        if high - low > 1:
            chosen.add(low + 1)
    chosen.add(points[-1])
    return [chr(code) for code in sorted(chosen)]


def _accepted(position: str | None, candidates: list[str]) -> frozenset[str]:
    if position is None:
        return frozenset(candidates)
    if len(position) == 1 and position != "?":  # a plain character: itself
        return frozenset(candidates) & {position}
    matches = _position_matcher(position)
    return frozenset(c for c in candidates if matches(c))


@functools.lru_cache(maxsize=1024)
def _position_matcher(position: str) -> Callable[[str], re.Match[str] | None]:
    return re.compile(fnmatch.translate(position), re.DOTALL).match


def globs_overlap(a: str, b: str) -> bool:
    """Whether some name matches both globs: the two read side by side, one character at a time."""
    candidates = _representatives(a, b)
    ta = [(p is None, _accepted(p, candidates)) for p in _positions(a)]
    tb = [(p is None, _accepted(p, candidates)) for p in _positions(b)]
    seen: set[tuple[int, int]] = set()
    pending = [(0, 0)]
    while pending:
        i, j = pending.pop()
        if (i, j) in seen:
            continue
        seen.add((i, j))
        if i == len(ta) and j == len(tb):
            return True
        a_star = i < len(ta) and ta[i][0]
        b_star = j < len(tb) and tb[j][0]
        if a_star:  # `*` matching nothing more
            pending.append((i + 1, j))
        if b_star:
            pending.append((i, j + 1))
        if i < len(ta) and j < len(tb) and ta[i][1] & tb[j][1]:
            pending.append((i if a_star else i + 1, j if b_star else j + 1))
    return False


def uncovered_name(outer: str, inner: str) -> str | None:
    """A name `inner` matches and `outer` does not (the shortest), or None when `outer` matches every
    name `inner` does. `inner` is read one character at a time beside every state `outer` can be in,
    so each (inner position, set of outer states) pair is visited once."""
    candidates = _representatives(outer, inner)
    to = [(p is None, _accepted(p, candidates)) for p in _positions(outer)]
    ti = [(p is None, _accepted(p, candidates)) for p in _positions(inner)]

    def closure(states: frozenset[int]) -> frozenset[int]:
        reached = set(states)
        for k in sorted(states):
            while k < len(to) and to[k][0]:  # `*` matching nothing more
                k += 1
                reached.add(k)
        return frozenset(reached)

    def step(states: frozenset[int], character: str) -> frozenset[int]:
        return closure(
            frozenset(k if to[k][0] else k + 1 for k in states if k < len(to) and character in to[k][1])
        )

    start = (0, closure(frozenset({0})))
    seen = {start}
    # Breadth first: the first name found is the shortest.
    pending: list[tuple[tuple[int, frozenset[int]], str]] = [(start, "")]
    while pending:
        following: list[tuple[tuple[int, frozenset[int]], str]] = []
        for (i, states), name in pending:
            if i == len(ti) and len(to) not in states:
                return name
            moves: list[tuple[tuple[int, frozenset[int]], str]] = []
            if i < len(ti):
                star, accepted = ti[i]
                if star:
                    moves.append(((i + 1, states), name))
                moves += [((i if star else i + 1, step(states, c)), name + c) for c in sorted(accepted)]
            for pair, longer in moves:
                if pair not in seen:
                    seen.add(pair)
                    (pending if len(longer) == len(name) else following).append((pair, longer))
        pending = following
    return None


def names_some(pattern: str) -> bool:
    """Whether the glob names some AMI: each of its positions accepts a character an AMI's name may
    hold, and a name of 3 to 128 of them fits it."""
    allowed = sorted(AMI_NAME_CHARACTERS)
    fixed, star = 0, False
    for position in _positions(pattern):
        if position is None:
            star = True
            continue
        fixed += 1
        if not _accepted(position, allowed):
            return False
    return fixed <= AMI_NAME_LENGTH[1] and (star or fixed >= AMI_NAME_LENGTH[0])


@functools.lru_cache(maxsize=1024)
def names_any(pattern: str) -> bool:
    """Whether the glob names any AMI: each of its positions a `*`, a `?` or a bracket that accepts
    every character an AMI's name may hold (`[!~]`, `[ -~]`), so no character of a name narrows it."""
    if not pattern:
        return False
    for position in _positions(pattern):
        if position is None or position == "?":
            continue
        if len(position) == 1 or _accepted(position, sorted(AMI_NAME_CHARACTERS)) != AMI_NAME_CHARACTERS:
            return False
    return True
