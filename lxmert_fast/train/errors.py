"""The error that stops a training job: it cannot continue (non-finite loss, a checkpoint that cannot be
saved or resumed...); the message says why. `lxmert_fast.train.entry` turns it into exit code 3."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, bad checkpoint...); the message says why."""
