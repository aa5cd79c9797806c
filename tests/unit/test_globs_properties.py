"""globs_overlap never misses a name two globs both match: a missed one would let a tag move an AMI
between two families that share differently, unrefused (policy._shares_apart_by_name)."""

from __future__ import annotations

import fnmatch

from hypothesis import given
from hypothesis import strategies as st

from ami_janitor.core.globs import _accepted, _positions, _representatives, globs_overlap

# Pieces of globs, the odd ones fnmatch reads in its own way among them (an unclosed bracket, a negated
# empty one, a reversed range, a backslash).
PIECES = [
    "a",
    "b",
    "-",
    "!",
    "]",
    "\\",
    "*",
    "?",
    "[ab]",
    "[!a]",
    "[a-c]",
    "[!b-c]",
    "[c-a]",
    "[",
    "[!]",
    "[]a]",
    "[a-[!]",
]
globs = st.lists(st.sampled_from(PIECES), max_size=5).map("".join)


@given(globs, globs, st.data())
def test_a_name_both_globs_match_is_never_missed(first: str, second: str, data: st.DataObject) -> None:
    # A name built to match `first`, position by position; then asked of `second`.
    candidates = _representatives(first, second)
    name = ""
    for position in _positions(first):
        if position is None:
            name += "".join(data.draw(st.lists(st.sampled_from(candidates), max_size=3)))
        else:
            accepted = sorted(_accepted(position, candidates))
            if not accepted:
                return  # `first` matches no name at all
            name += data.draw(st.sampled_from(accepted))
    assert fnmatch.fnmatchcase(name, first)
    if fnmatch.fnmatchcase(name, second):
        assert globs_overlap(first, second), name
        assert globs_overlap(second, first), name


def test_overlaps_as_fnmatch_reads_the_globs() -> None:
    assert globs_overlap("svc-*", "svc-*")
    assert globs_overlap("svc-*", "*-partner-*")
    assert globs_overlap("web-[0-9]*", "web-1*")
    assert not globs_overlap("pettracker-api-*", "pettracker-ml-*")
    assert not globs_overlap("web-[0-9]*", "web-[!0-9]*")
    assert not globs_overlap("web-?", "web-??")
    assert not globs_overlap("app-[", "app-a")  # an unclosed bracket is a literal `[`
    assert globs_overlap("app-[!]", "app-[!]")  # so is this one: `[`, `!`, `]`
    assert not globs_overlap("a[c-a]", "a*")  # a reversed range matches nothing
