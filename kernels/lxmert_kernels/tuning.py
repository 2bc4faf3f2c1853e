"""Launch configurations: a heuristics table by default, autotuning on request, cached on disk.

Default: :func:`heuristic` looks the configuration up in ``TABLE``, keyed on (kernel, GPU arch,
length buckets, head dim, dtype, dropout). Nothing is benchmarked, so the first training step
costs no tuning and every process launches the same kernels.

Opt in to autotuning with the module setting (never an environment variable)::

    import lxmert_kernels
    lxmert_kernels.tuning.set_autotune(True, cache_dir="~/.cache/lxmert_kernels")   # or settings.autotune = True

Then the first launch of each (kernel, key) benchmarks a pruned candidate list (see
``candidates``) and stores the winner in ``<cache_dir>/autotune-<triton version>.json``; other
processes read it from there and benchmark nothing. Tune outside CUDA-graph capture (warm up
first: torch.compile's cudagraph trees run eagerly before they capture).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Callable, Dict, List, Optional

import triton


@dataclasses.dataclass
class Settings:
    autotune: bool = False
    cache_dir: Optional[str] = None  # None: ~/.cache/lxmert_kernels


settings = Settings()


def set_autotune(enabled: bool, cache_dir: Optional[str] = None) -> None:
    """Turn autotuning on or off for this process (``cache_dir``: where results persist)."""
    settings.autotune = bool(enabled)
    settings.cache_dir = cache_dir


def length_bucket(n: int) -> int:
    """Power-of-two bucket (at least 16) of a sequence length: the tile that holds it."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


# ----------------------------------------------------------------------------------------------
# the heuristics table
# ----------------------------------------------------------------------------------------------
# One row per case, first match wins. Keys: kernel family; arch: minimum compute capability
# (major * 10 + minor; 0 = any, including the interpreter); max_tile: the row applies when
# BLOCK_Q * BLOCK_K (one-tile kernels) or the bucketed Lq * Lk (multi-block kernels) is at most
# this; max_d: head dims up to this; dtype: "any" or "fp32"; dropout: None = either.
# Values: warps / stages and, for multi-block kernels, BLOCK_M / BLOCK_N.
# Sized with kernels/tools/compile_check.py --report (sm_90, no spills at the LXMERT shapes).
TABLE: List[dict] = [
    # fp32 inputs use IEEE fp32 dots (FMA, no tensor cores): twice the warps for the same tile
    dict(kernel="fwd_one_tile", arch=0, max_tile=2048, max_d=128, dtype="float32", dropout=None, num_warps=8, num_stages=1),
    dict(kernel="fwd_one_tile", arch=0, max_tile=16384, max_d=128, dtype="float32", dropout=None, num_warps=16, num_stages=1),
    dict(kernel="bwd_one_tile", arch=0, max_tile=2048, max_d=128, dtype="float32", dropout=None, num_warps=8, num_stages=1),
    dict(kernel="bwd_one_tile", arch=0, max_tile=16384, max_d=128, dtype="float32", dropout=None, num_warps=16, num_stages=1),
    dict(kernel="fwd", arch=0, max_tile=1 << 62, max_d=128, dtype="float32", dropout=None,
         BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
    dict(kernel="dkdv", arch=0, max_tile=1 << 62, max_d=128, dtype="float32", dropout=None,
         BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2),
    dict(kernel="dq", arch=0, max_tile=1 << 62, max_d=128, dtype="float32", dropout=None,
         BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2),
    # one-tile forward / backward (a direction's queries and keys fit one tile)
    dict(kernel="fwd_one_tile", arch=0, max_tile=2048, max_d=128, dtype="any", dropout=None, num_warps=4, num_stages=1),
    dict(kernel="fwd_one_tile", arch=0, max_tile=16384, max_d=128, dtype="any", dropout=None, num_warps=8, num_stages=1),
    dict(kernel="bwd_one_tile", arch=0, max_tile=2048, max_d=64, dtype="any", dropout=None, num_warps=4, num_stages=1),
    dict(kernel="bwd_one_tile", arch=0, max_tile=16384, max_d=128, dtype="any", dropout=None, num_warps=8, num_stages=1),
    # multi-block kernels (longer sequences)
    dict(kernel="fwd", arch=0, max_tile=64 * 64, max_d=128, dtype="any", dropout=None,
         BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    dict(kernel="fwd", arch=0, max_tile=1 << 62, max_d=128, dtype="any", dropout=None,
         BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(kernel="dkdv", arch=0, max_tile=1 << 62, max_d=64, dtype="any", dropout=False,
         BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(kernel="dkdv", arch=0, max_tile=1 << 62, max_d=64, dtype="any", dropout=True,  # 4 warps: 255 regs + spills
         BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(kernel="dkdv", arch=0, max_tile=1 << 62, max_d=128, dtype="any", dropout=None,
         BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(kernel="dq", arch=0, max_tile=64 * 64, max_d=128, dtype="any", dropout=None,
         BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    dict(kernel="dq", arch=0, max_tile=1 << 62, max_d=128, dtype="any", dropout=None,
         BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
]

# The interpreter ignores warps and stages; multi-block kernels run with 32 x 32 blocks there.
INTERPRETER_BLOCKS = dict(BLOCK_M=32, BLOCK_N=32)


def heuristic(kernel: str, arch: int, lq: int, lk: int, D: int, dtype: str, dropout: bool) -> dict:
    """The table's configuration for this case (a copy; ValueError when no row matches)."""
    tile = length_bucket(lq) * length_bucket(lk)
    for row in TABLE:
        if (row["kernel"] == kernel and arch >= row["arch"] and tile <= row["max_tile"] and D <= row["max_d"]
                and row["dtype"] in ("any", dtype) and row["dropout"] in (None, dropout)):
            return {k: v for k, v in row.items() if k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
    raise ValueError(f"lxmert_kernels.tuning: no heuristic row for {kernel} lq={lq} lk={lk} D={D} {dtype}")


FORWARD_QUERY_BLOCK = 32


def forward_query_block(bq: int, bk: int) -> int:
    """Query rows per program of the one-tile forward of plain attention (the backward keeps every
    query in one program: its dK and dV sum over them).

    A 64-query tile with up to 64 keys (LXMERT's 36 objects) runs as two 32-query programs: in one
    64 x 64 program at 8 warps Triton keeps the score tile in one warpgroup (the other four warps
    hold copies), so each thread computes 32 scores and their dropout; at 32 x 64 and 4 warps
    it is 16, with no copies (offline sm_90: dropout adds 36% SASS instead of 50%).
    """
    if bq > FORWARD_QUERY_BLOCK and bq * bk <= 64 * 64:
        return FORWARD_QUERY_BLOCK
    return bq


def candidates(kernel: str, lq: int, lk: int, D: int) -> List[dict]:
    """Pruned autotuning candidates: blocks no larger than the bucketed lengths need, and the
    warps / stages that make sense for the tile."""
    if kernel in ("fwd_one_tile", "bwd_one_tile"):
        tile = length_bucket(lq) * length_bucket(lk)
        warps = (2, 4, 8) if tile <= 1024 else (4, 8)  # 2 warps spill on larger tiles (sm_90 report)
        return [dict(num_warps=w, num_stages=s) for w in warps for s in (1, 2)]
    bq, bk = length_bucket(lq), length_bucket(lk)
    out = []
    for bm in (32, 64, 128):
        for bn in (32, 64, 128):
            if bm > max(32, bq) or bn > max(32, bk) or bm * bn * D > 128 * 64 * 128:
                continue
            for w in (4, 8):
                if w == 8 and bm * bn < 32 * 64:
                    continue
                out.append(dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=2))
    return out


# ----------------------------------------------------------------------------------------------
# opt-in autotuning with an on-disk cache
# ----------------------------------------------------------------------------------------------
class Autotuner:
    """Benchmarks candidates once per key and remembers the winner in memory and on disk."""

    def __init__(self, bench: Optional[Callable[[Callable[[], None]], float]] = None) -> None:
        self._bench = bench
        self._memory: Dict[str, dict] = {}
        self._loaded_from: Optional[str] = None

    def cache_path(self) -> str:
        root = os.path.expanduser(settings.cache_dir or os.path.join("~", ".cache", "lxmert_kernels"))
        return os.path.join(root, f"autotune-triton{triton.__version__}.json")

    def _load(self) -> None:
        path = self.cache_path()
        if self._loaded_from == path:
            return
        self._loaded_from = path
        if os.path.exists(path):
            with open(path) as f:
                self._memory.update(json.load(f))

    def _save(self) -> None:
        path = self.cache_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self._memory, f, indent=0, sort_keys=True)
        os.replace(tmp, path)  # atomic: concurrent processes never read half a file

    def choose(self, key: str, configs: List[dict], launch: Callable[[dict], None]) -> dict:
        """The best of ``configs`` for ``key``: from the cache, else by timing ``launch(config)``."""
        self._load()
        if key in self._memory:
            return dict(self._memory[key])
        bench = self._bench or _do_bench
        timings = []
        for cfg in configs:
            try:
                timings.append((bench(lambda cfg=cfg: launch(cfg)), cfg))
            except Exception as err:  # noqa: BLE001 - a config that does not compile/fit is skipped, said once
                timings.append((float("inf"), cfg))
                print(f"lxmert_kernels.tuning: {key}: config {cfg} failed: {type(err).__name__}: {err}")
        best_time, best = min(timings, key=lambda t: t[0])
        if best_time == float("inf"):
            raise RuntimeError(f"lxmert_kernels.tuning: every candidate config failed for {key}")
        self._memory[key] = dict(best)
        self._save()
        return dict(best)


def _do_bench(fn: Callable[[], None]) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=25)


tuner = Autotuner()


def config_for(kernel: str, arch: int, lq: int, lk: int, D: int, dtype: str, dropout: bool, flags: str,
               launch: Callable[[dict], None]) -> dict:
    """The launch configuration: the heuristics table, or (``settings.autotune``) the tuned one."""
    if not settings.autotune:
        return heuristic(kernel, arch, lq, lk, D, dtype, dropout)
    key = f"{kernel}|sm{arch}|{length_bucket(lq)}x{length_bucket(lk)}|D{D}|{dtype}|drop{int(dropout)}|{flags}"
    return tuner.choose(key, candidates(kernel, lq, lk, D), launch)
