"""The training process's host memory (`lxmert_fast.train.host_memory`): the garbage collector on the loop's
schedule, and glibc keeping the blocks a CPU step frees."""
from __future__ import annotations

import gc
import platform

import pytest

from lxmert_fast.pretrain import build_parser
from lxmert_fast.train import host_memory
from lxmert_fast.train.host_memory import ScheduledGC, keep_freed_host_memory
from lxmert_fast.train.runtime import Trainer, UsageError


@pytest.fixture
def collections(monkeypatch):
    """The generations `gc.collect` is asked for, without collecting."""
    asked: list[int] = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: asked.append(generation) or 0)
    return asked


def test_inside_the_loop_the_collector_runs_every_n_steps_and_is_restored_after(collections):
    assert gc.isenabled()
    schedule = ScheduledGC(every=3)
    schedule.start()
    assert not gc.isenabled() and collections == [2]  # a full collection before the loop, then off
    for step in range(1, 8):
        schedule.step(step)
    schedule.stop()
    assert collections == [2, 1, 1]  # steps 3 and 6: the young generations
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off(collections):
    gc.disable()
    try:
        schedule = ScheduledGC(every=2)
        schedule.start()
        schedule.stop()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_every_zero_leaves_pythons_collector_alone(collections):
    schedule = ScheduledGC(every=0)
    schedule.start()
    assert gc.isenabled()
    for step in range(1, 5):
        schedule.step(step)
    schedule.stop()
    assert collections == [] and gc.isenabled()


def test_a_negative_gc_every_is_a_usage_error():
    with pytest.raises(ValueError, match="--gc_every must be 0"):
        ScheduledGC(-1)
    args = build_parser().parse_args(["--model", "tiny", "--gc_every", "-5", "--engine", "torch"])
    with pytest.raises(UsageError, match="--gc_every must be 0 .* got -5"):
        Trainer(args, recipe=None)


class FakeMallopt:
    """glibc's mallopt as ctypes gives it: records its calls and answers ``answer`` (1 done, 0 refused)."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []
        self.answer = 1
        self.argtypes = self.restype = None

    def __call__(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.answer


class FakeLibc:
    def __init__(self, mallopt: FakeMallopt):
        self.mallopt = mallopt


@pytest.fixture
def fake_mallopt(monkeypatch):
    mallopt = FakeMallopt()

    def cdll(name):
        assert name is None  # the C library the interpreter runs on
        return FakeLibc(mallopt)

    monkeypatch.setattr(host_memory.ctypes, "CDLL", cdll)
    return mallopt


def test_glibc_keeps_blocks_up_to_32_mib_and_never_trims_below_1_gib(fake_mallopt):
    assert keep_freed_host_memory() is None
    assert fake_mallopt.calls == [(-3, 32 << 20), (-1, 1 << 30)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD (malloc.h)


def test_a_refusal_or_no_glibc_is_said_not_hidden(fake_mallopt, monkeypatch):
    fake_mallopt.answer = 0
    assert keep_freed_host_memory() == "glibc's mallopt refused the thresholds"

    class NoMallopt:
        pass

    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda name: NoMallopt())
    assert keep_freed_host_memory() == "the C library has no mallopt (not glibc)"


def test_this_c_library_takes_the_thresholds_or_says_why():
    """glibc (most Linux distributions) takes them; another C library (macOS, musl) is named as the reason."""
    if platform.libc_ver()[0] == "glibc":
        assert keep_freed_host_memory() is None
    else:
        assert keep_freed_host_memory() in ("the C library has no mallopt (not glibc)",
                                            "glibc's mallopt refused the thresholds")


def test_the_training_loop_collects_on_its_schedule_and_gives_the_collector_back(tmp_path, monkeypatch):
    """A pre-training run of 4 steps: the loop hands every step to the schedule with the collector off, and the
    collector is on again when the job returns."""
    from lxmert_fast import pretrain
    from tests.test_finetune_helpers import demo_world, one_thread

    seen: list[tuple[int, bool]] = []
    step = ScheduledGC.step
    monkeypatch.setattr(ScheduledGC, "step", lambda self, n: seen.append((n, gc.isenabled())) or step(self, n))
    with one_thread():
        assert pretrain.main(["--data_root", demo_world(), "--model", "tiny", "--micro_batch_size", "8",
                              "--max_steps", "4", "--gc_every", "2", "--eval_every", "0", "--eval_batches", "1",
                              "--no_progress", "--num_workers", "0", "--grounding_eval", "no", "--no_export",
                              "--engine", "torch", "--output_dir", str(tmp_path / "run")]) == 0
    assert seen == [(1, False), (2, False), (3, False), (4, False)]
    assert gc.isenabled()
