"""globs_overlap never misses a name two globs both match: a missed one would let a tag move an AMI
between two families that share differently, unrefused (policy._shares_apart_by_name). uncovered_name
finds a name one glob matches and the other does not whenever there is one: a missed one would let a
family load that does not select all of its own bakes (policy.Family._bake_names_match)."""

from __future__ import annotations

import fnmatch

from hypothesis import given
from hypothesis import strategies as st

from ami_janitor.core.globs import (
    AMI_NAME_CHARACTERS,
    _accepted,
    _positions,
    _representatives,
    globs_overlap,
    names_any,
    names_some,
    uncovered_name,
)
from ami_janitor.core.policy import _names_some

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


def _a_name_matching(glob: str, candidates: list[str], data: st.DataObject) -> str | None:
    """A name built to match `glob`, position by position, of the candidate characters."""
    name = ""
    for position in _positions(glob):
        if position is None:
            name += "".join(data.draw(st.lists(st.sampled_from(candidates), max_size=3)))
        else:
            accepted = sorted(_accepted(position, candidates))
            if not accepted:
                return None  # `glob` matches no name at all
            name += data.draw(st.sampled_from(accepted))
    return name


@given(globs, globs, st.data())
def test_a_name_both_globs_match_is_never_missed(first: str, second: str, data: st.DataObject) -> None:
    # A name built to match `first`, position by position; then asked of `second`.
    name = _a_name_matching(first, _representatives(first, second), data)
    if name is None:
        return  # `first` matches no name at all
    assert fnmatch.fnmatchcase(name, first)
    if fnmatch.fnmatchcase(name, second):
        assert globs_overlap(first, second), name
        assert globs_overlap(second, first), name


@given(globs, globs, st.data())
def test_an_uncovered_name_is_found_whenever_there_is_one(
    outer: str, inner: str, data: st.DataObject
) -> None:
    missed = uncovered_name(outer, inner)
    if missed is not None:
        assert fnmatch.fnmatchcase(missed, inner)
        assert not fnmatch.fnmatchcase(missed, outer)
        return
    name = _a_name_matching(inner, _representatives(outer, inner), data)
    if name is not None:
        assert fnmatch.fnmatchcase(name, inner)
        assert fnmatch.fnmatchcase(name, outer), name


def test_uncovered_names_as_fnmatch_reads_the_globs() -> None:
    bakes = "web-" + "[0-9]" * 8 + "T" + "[0-9]" * 6 + "Z"
    for covering in ("*", "web-*", "we?-*", "web-[0-9]*", "web-*Z", "web-????????T??????Z", "web-[!x]*"):
        assert uncovered_name(covering, bakes) is None, covering
    assert uncovered_name("web-2026*", bakes) == "web-00000000T000000Z"
    assert uncovered_name("web-[0-8]*", bakes) == "web-90000000T000000Z"
    assert uncovered_name("web-*T03*", bakes) is not None
    assert uncovered_name("a*", "a*b") is None
    assert uncovered_name("a*b", "a*") == "a"
    assert uncovered_name("a?", "a*") == "a"
    assert uncovered_name("a[c-a]", "a[c-a]") is None  # matches nothing, so nothing is missed


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


# Globs of wildcards and brackets, some of which every character of an AMI's name passes.
WIDE_PIECES = ["*", "?", "[!~]", "[ -~]", "[!a]", "[a-z]", "[!{]", "[]-~ -]", "a", "[!]"]
AMI_NAMES = st.text(alphabet=sorted(AMI_NAME_CHARACTERS), min_size=3, max_size=12)


@given(st.lists(st.sampled_from(WIDE_PIECES), max_size=4).map("".join), AMI_NAMES)
def test_a_glob_said_to_name_any_ami_matches_every_ami_name(glob: str, name: str) -> None:
    """names_any says a glob selects any AMI (a sharing family with it is matched by tags alone): with a
    `*` and at most 3 other positions, it must then match every name EC2 allows (3 characters and up)."""
    positions = list(_positions(glob))
    if names_any(glob) and None in positions and len(positions) - positions.count(None) <= 3:
        assert fnmatch.fnmatchcase(name, glob), (glob, name)


# Pieces that no AMI name holds, or only some positions can take (`{`, `:`, a bracket of neither).
NAMING_PIECES = [*PIECES, "{", ":", "[{:]", "[!a-zA-Z0-9()[\\] ./'@_-]", "[z-a]", "x", "."]


@given(st.lists(st.sampled_from(NAMING_PIECES), max_size=6).map("".join), st.data())
def test_a_glob_names_some_ami_exactly_when_an_ami_name_matches_it(glob: str, data: st.DataObject) -> None:
    """names_some refuses a family's glob (the policy is refused): where it says no AMI can match, none
    must; where it says one can, a name EC2 allows is built that does. The policy's own reading, which
    leaves a glob without a bracket to itself, says the same."""
    allowed = sorted(AMI_NAME_CHARACTERS)
    positions = list(_positions(glob))
    accepted = [sorted(_accepted(p, allowed)) if p is not None else [] for p in positions]
    stars = positions.count(None)
    fixed = len(positions) - stars
    if names_some(glob):
        name = "".join(
            data.draw(st.sampled_from(a)) if p is not None else ""
            for p, a in zip(positions, accepted, strict=True)
        )
        if fixed < 3:  # a star takes what a name needs beyond the glob's fixed positions
            at = positions.index(None)
            name = name[:at] + "a" * (3 - fixed) + name[at:]
        assert 3 <= len(name) <= 128 and set(name) <= AMI_NAME_CHARACTERS
        assert fnmatch.fnmatchcase(name, glob), (glob, name)
    else:
        name = data.draw(AMI_NAMES)
        assert not fnmatch.fnmatchcase(name, glob), (glob, name)
    assert _names_some(glob) == names_some(glob), glob


def test_globs_that_name_no_ami() -> None:
    for glob in ("pettracker-{ml,x}-*", "web:*", "web-[z-a]*", "ab", "?" * 129, "[{}]*"):
        assert not names_some(glob) and not _names_some(glob), glob
    for glob in ("web-*", "web-[*", "???", "*", "a[!{]c", "[a-z][0-9]?"):
        assert names_some(glob) and _names_some(glob), glob
