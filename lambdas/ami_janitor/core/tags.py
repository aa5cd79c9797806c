"""Sets of short values recorded across numbered tags (an EC2 tag value holds at most 256 characters).

A record `base` is kept in the tags `base`, `base:2`, `base:3`, ...; each holds whole values joined by
commas, never a value cut in two. So every tag reads on its own: a crash between writing the new parts
and deleting the stale ones leaves a record that still parses (with values to spare, never garbage).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

TAG_VALUE_MAX = 256
SEPARATOR = ","


def part_key(base: str, part: int) -> str:
    """The key of part `part` (1-based) of the record `base`."""
    return base if part == 1 else f"{base}:{part}"


def is_part_key(base: str, key: str) -> bool:
    if key == base:
        return True
    prefix, _, number = key.rpartition(":")
    # ASCII digits only: str.isdigit() is also true of "²" and other digits int() cannot read, and
    # anyone may write such a key on any AMI.
    return prefix == base and number.isascii() and number.isdigit() and int(number) >= 2


def split_values(base: str, values: Iterable[str]) -> dict[str, str]:
    """The sorted, distinct values packed whole into parts of at most 256 characters.

    No value gives one empty part (the record exists and says "nothing").
    """
    parts: list[str] = []
    current = ""
    for value in sorted(set(values)):
        if not value or SEPARATOR in value or len(value) > TAG_VALUE_MAX:
            raise ValueError(f"cannot record {value!r} in a tag: empty, too long or containing a comma")
        candidate = f"{current}{SEPARATOR}{value}" if current else value
        if len(candidate) > TAG_VALUE_MAX:
            parts.append(current)
            candidate = value
        current = candidate
    parts.append(current)
    return {part_key(base, n): text for n, text in enumerate(parts, start=1)}


def joined_values(base: str, tags: Mapping[str, str]) -> list[str]:
    """Every value recorded in any part of `base`, sorted and distinct (no part: an empty list)."""
    values: set[str] = set()
    for key, text in tags.items():
        if is_part_key(base, key):
            values.update(value for value in text.split(SEPARATOR) if value)
    return sorted(values)


def part_keys(base: str, tags: Iterable[str]) -> list[str]:
    """The keys among `tags` that hold a part of `base`."""
    return sorted(key for key in tags if is_part_key(base, key))
