"""rtunnel's tests.

Hypothesis profiles: "default" (quick, for every run) and "fuzz" (long, for
the CI fuzz step). The one named by $HYPOTHESIS_PROFILE is loaded here,
before any test module builds its settings, so tests whose @settings do not
pin max_examples follow it:

    HYPOTHESIS_PROFILE=fuzz python -m twisted.trial tests.test_session_fuzz
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# on one line: .ci/run looks for register_profile("fuzz" to decide on its fuzz step
settings.register_profile("fuzz", max_examples=2000, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
