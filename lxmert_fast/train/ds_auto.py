"""What every module that fills the DeepSpeed config shares: the "auto" value and `DSConfigError`.

`ds_config` fills the batch and schedule entries and calls `monitors` and `profiler` for their sections;
all three raise `DSConfigError` for a config that does not fit the run.
"""

from __future__ import annotations

AUTO = "auto"


class DSConfigError(ValueError):
    """The DeepSpeed config does not fit the run (the message names the values involved)."""
