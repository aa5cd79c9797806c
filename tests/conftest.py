import os

from hypothesis import HealthCheck, settings

# `make test` runs the quick profile; `make fuzz` runs every property with 10,000 examples.
settings.register_profile("quick", max_examples=60, deadline=None)
settings.register_profile(
    "fuzz", max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))
