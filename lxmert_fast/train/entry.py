"""A job's `main()`: process-wide settings, then the job, with errors turned into exit codes.

Exit codes: 0 done; 2 a usage or data error found before training (bad flag, config, data file,
checkpoint); 3 training could not continue (non-finite loss, no usable checkpoint, a checkpoint that could
not be written); 75 stopped by SIGTERM / SIGUSR1 with nothing lost (`lxmert_fast.train.preemption`: a
checkpoint at the step where the signal arrived; run the same command with ``--resume`` to continue).
The message goes to stderr once (rank 0).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable, Optional

from lxmert_fast.checkpoints.layouts import CheckpointError
from lxmert_fast.config import ConfigError
from lxmert_fast.data.formats import DataFormatError
from lxmert_fast.data.store import StoreError
from lxmert_fast.train import process
from lxmert_fast.train.ds_auto import DSConfigError
from lxmert_fast.train.errors import TrainingError
from lxmert_fast.train.preemption import EXIT_PREEMPTED, StopRequested
from lxmert_fast.train.runtime import UsageError


def quiet_known_warnings() -> None:
    """DeepSpeed calls torch.distributed functions that torch >= 2.12 marks deprecated, on every step."""
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\..* is deprecated")


def report(err: BaseException) -> None:
    """The error on rank 0 (every rank reaches the same decision; one message is enough)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {err}", file=sys.stderr, flush=True)


def usage_errors() -> tuple[type, ...]:
    """What a job reports as a usage or data error (exit code 2): found before training starts."""
    return (UsageError, DSConfigError, FileNotFoundError, ConfigError, DataFormatError, StoreError, CheckpointError)


def run_job(run: Callable[[Optional[list[str]]], dict], argv: Optional[list[str]],
            more_usage_errors: tuple[type, ...] = ()) -> int:
    quiet_known_warnings()
    try:
        result = run(argv)
    except StopRequested as stop:  # before or after training: nothing to save, nothing lost
        report_stop(f"stopped by {stop} outside the training loop (nothing to save; nothing lost): run the same "
                    f"command again to continue (with --resume if it had written a checkpoint)")
        return EXIT_PREEMPTED
    except TrainingError as err:
        report(err)
        return 3
    except usage_errors() + more_usage_errors as err:
        report(err)
        return 2
    stopped = result.get("stopped_by") if isinstance(result, dict) else None
    if stopped:
        step, kept = result["step"], result["checkpoint_step"]
        held = ("it holds every step trained" if kept == step else
                f"steps {kept + 1}-{step} are not kept (the loss was non-finite since it)" if kept else
                "no checkpoint was kept (the loss was non-finite): run it again from the start")
        report_stop(f"stopped by {stopped} after step {step}: checkpoint {result['checkpoint']}; {held}. Continue "
                    f"with the same command and --resume (exit code {EXIT_PREEMPTED})")
        return EXIT_PREEMPTED
    return 0


def report_stop(msg: str) -> None:
    """A stop's message, on rank 0's stderr (as `report`, without "error")."""
    if os.environ.get("RANK", "0") == "0":
        print(msg, file=sys.stderr, flush=True)


def exit_script(main: Callable[[], int]) -> None:
    """A job script's ``__main__``: run ``main()``, leave the process group after success (every
    rank waits for the others, so none exits while a peer still needs it), exit with its code.
    After a stop on a signal the group is taken down without waiting (a stop the ranks agreed on has
    passed a barrier already; one outside the loop may have peers that never arrive); after a failure
    no rank waits: its peers may never arrive."""
    code = main()
    if code == 0:
        process.leave_process_group()
    elif code == EXIT_PREEMPTED:
        process.leave_process_group(wait=False)
    sys.exit(code)
