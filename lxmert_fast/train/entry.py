"""A job's `main()`: process-wide settings, then the job, with errors turned into exit codes.

Exit codes: 0 done; 2 a usage or data error found before training (bad flag, config, data file,
checkpoint); 3 training could not continue (non-finite loss, unusable checkpoint). The message goes
to stderr once (rank 0).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable, Optional

from lxmert_fast.train.checkpoint import TrainingError


def quiet_known_warnings() -> None:
    """DeepSpeed calls torch.distributed functions that torch >= 2.12 marks deprecated, on every step."""
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\..* is deprecated")


def report(err: BaseException) -> None:
    """The error on rank 0 (every rank reaches the same decision; one message is enough)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {err}", file=sys.stderr, flush=True)


def usage_errors() -> tuple[type, ...]:
    """What a job reports as a usage or data error (exit code 2): found before training starts."""
    from lxmert_fast.config import ConfigError
    from lxmert_fast.data.formats import DataFormatError
    from lxmert_fast.data.store import StoreError
    from lxmert_fast.model.convert import CheckpointError
    from lxmert_fast.train.ds_config import DSConfigError
    from lxmert_fast.train.runtime import UsageError

    return (UsageError, DSConfigError, FileNotFoundError, ConfigError, DataFormatError, StoreError, CheckpointError)


def run_job(run: Callable[[Optional[list[str]]], dict], argv: Optional[list[str]],
            more_usage_errors: tuple[type, ...] = ()) -> int:
    quiet_known_warnings()
    try:
        run(argv)
    except TrainingError as err:
        report(err)
        return 3
    except usage_errors() + more_usage_errors as err:
        report(err)
        return 2
    return 0


def exit_script(main: Callable[[], int]) -> None:
    """A job script's ``__main__``: run ``main()``, leave the process group after success (every
    rank waits for the others, so none exits while a peer still needs it), exit with its code.
    After a failure no rank waits: its peers may never arrive."""
    from lxmert_fast.train.process import leave_process_group

    code = main()
    if code == 0:
        leave_process_group()
    sys.exit(code)
