"""EC2's throttling on the server side, for the in-memory EC2 of fake_ec2.py: the account's token
buckets (aws/pacing.py's table, full size: no share), refilled by the fake's simulated clock. A call
takes a token of its bucket or is refused with RequestLimitExceeded before it takes effect.

Written apart from aws/pacing.py's Pacer on purpose (only the table is shared), so a pacer is checked
against buckets it does not itself keep."""

from __future__ import annotations

from collections import Counter

from ami_janitor.aws.pacing import SIZES, bucket_name

# A float clock's rounding must not refuse a call that comes when its token is due.
TOLERANCE = 1e-9


class AccountBuckets:
    """The buckets of one account and region, each full until first used."""

    def __init__(self, *, full_since: float | None = None) -> None:
        # Each bucket is full at its first use, or at `full_since` and refilling from then (a caller
        # that starts its own count later never finds fewer tokens than it counts).
        self.full_since = full_since
        self._levels: dict[str, tuple[float, float]] = {}  # bucket -> (tokens, when counted)
        self.taken: Counter[str] = Counter()  # API -> calls let through
        self.refused: Counter[str] = Counter()  # API -> calls refused

    def tokens(self, api: str, now: float) -> float:
        """The tokens in the bucket of `api` at `now` (seconds on the fake's clock)."""
        size, refill = SIZES[bucket_name(api)]
        start = now if self.full_since is None else self.full_since
        tokens, counted = self._levels.get(bucket_name(api), (float(size), start))
        return min(float(size), tokens + max(0.0, now - counted) * refill)

    def take(self, api: str, now: float) -> bool:
        """A call of `api` arrives at `now`: True if it took a token, False if EC2 refuses it."""
        tokens = self.tokens(api, now)
        if tokens < 1 - TOLERANCE:
            self._levels[bucket_name(api)] = (tokens, now)
            self.refused[api] += 1
            return False
        self._levels[bucket_name(api)] = (max(0.0, tokens - 1), now)
        self.taken[api] += 1
        return True
