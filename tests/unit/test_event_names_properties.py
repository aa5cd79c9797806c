"""A janitor session's clients name their events as botocore's do (aws/clients.py, QuickAliaser): over names
made of every alias's parts, the janitor's services and other parts, in any order."""

from __future__ import annotations

import botocore.hooks
from hypothesis import given
from hypothesis import strategies as st

from ami_janitor.aws import models
from ami_janitor.aws.clients import QuickAliaser

# The parts event names are made of: every part of every alias (old and new) and of the janitor's
# services, the kinds of events botocore emits, and operations.
_EVENT_PARTS = sorted(
    {
        *(part for old, new in botocore.hooks.EVENT_ALIASES.items() for part in [*old.split("."), new]),
        *models.SERVICES,
        "before-call",
        "before-parameter-build",
        "needs-retry",
        "DescribeImages",
        "Scan",
        "metadata",
        "iotx",
    }
)


# Each piece of a name: a part, or an alias whole (`data.iot`, `streams.dynamodb`), so that dotted
# aliases come up as often as single parts.
_PIECES = st.sampled_from(_EVENT_PARTS) | st.sampled_from(sorted(botocore.hooks.EVENT_ALIASES))


@given(st.lists(_PIECES, min_size=1, max_size=5))
def test_the_quick_aliaser_names_every_event_as_botocores_does(parts: list[str]) -> None:
    """Names made of aliases' parts (dotted aliases among them, in and out of order) and of other
    parts: the janitor's clients emit each under the name botocore's aliaser gives it."""
    event_name = ".".join(parts)
    theirs = botocore.hooks.EventAliaser(botocore.hooks.HierarchicalEmitter())
    ours = QuickAliaser(botocore.hooks.HierarchicalEmitter())
    assert ours._alias_event_name(event_name) == theirs._alias_event_name(event_name)
    assert ours._alias_event_name(event_name) == theirs._alias_event_name(event_name)  # from its cache
