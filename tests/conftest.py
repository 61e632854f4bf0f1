"""Test-wide settings. Hypothesis draws the same examples on every run by default, so that
CI's verdict does not depend on luck; `HYPOTHESIS_PROFILE=explore` draws new ones each run,
to look for failures."""

import os

from hypothesis import settings

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
