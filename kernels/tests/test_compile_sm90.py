"""Compile kernels for Hopper (sm_90) without a GPU: the production variants (the heuristic
configurations spill nothing, and dropout adds at most 40% SASS instructions to an attention
forward, issue 15's target), and every kernel the test suite itself defines, as its tests launch it.

The interpreter does not check what only the compiler checks (types of loop-carried values,
layouts, shared memory, registers), so this runs ``tools/compile_check.py --report`` in a
subprocess (the test process runs the interpreter): every launch of the ops at the LXMERT base
shapes (bf16, D=64, dropout off and on, and a 512-token self-attention for the multi-launch
kernels), specialised as a real launch, through ptxas. The test suite's own kernels are built the
same way from the launches their tests make (``tools/launch_recorder.py`` records them in a pytest
subprocess; ``compile_check.py --launches`` builds them). Skipped where Triton's CUDA backend is
missing.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

KERNELS_DIR = Path(__file__).resolve().parents[1]
REPO_DIR = KERNELS_DIR.parent
TOOLS_DIR = KERNELS_DIR / "tools"
sys.path.insert(0, str(TOOLS_DIR))

import launch_recorder  # noqa: E402  (imports triton only when recording)
import report_summary  # noqa: E402  (pure Python: no compiler needed)

# a kernel definition at the start of a line (kernel sources quoted in a test are indented)
KERNEL_DEFINITION = re.compile(r"^@triton\.jit\b[^\n]*\n(?:@[^\n]*\n)*def (\w+)\(", re.M)


def _cuda_backend_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _compiler_env() -> dict:
    """The environment of a child that compiles (no TRITON_INTERPRET) and finds kernels/tools."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(KERNELS_DIR), str(TOOLS_DIR), env.get("PYTHONPATH", "")])
    return env


def _build_recorded(launches: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOLS_DIR / "compile_check.py"), "--launches", str(launches),
                           "--tests-only"], env=_compiler_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def report_rows():
    res = subprocess.run([sys.executable, str(TOOLS_DIR / "compile_check.py"), "--report"],
                         env=_compiler_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.skipif(not _cuda_backend_available(), reason="Triton's CUDA backend is not installed")
def test_heuristic_configs_compile_for_sm90_without_spills(report_rows):
    kernels = {r["kernel"] for r in report_rows}
    assert {"_attn_fwd_one_tile_kernel", "_attn_bwd_one_tile_kernel", "_attn_fwd_kernel", "_attn_bwd_dkdv_kernel",
            "_attn_bwd_dq_kernel", "_ln_fwd_kernel", "_ln_bwd_kernel", "_bias_gelu_fwd_kernel",
            "_bias_gelu_bwd_kernel"} <= kernels, kernels
    for r in report_rows:
        assert r["heuristic"] and r["regs"] > 0 and r["sass_instructions"] > 0, r
        assert r["spill_bytes"] == 0, f"{r['kernel']} {r['scenario']} {r['config']} spills {r['spill_bytes']} bytes"


@pytest.mark.skipif(not _cuda_backend_available(), reason="Triton's CUDA backend is not installed")
def test_dropout_adds_at_most_40_percent_to_every_attention_forward(report_rows):
    """SASS instructions with p = 0.1 against p = 0, same case and configuration, for the
    one-tile forwards (cross pair, self 20, self 36) and the multi-launch forward (512 tokens)."""
    pairs = report_summary.dropout_overheads(report_rows, report_summary.ATTENTION_FORWARDS)
    assert len(pairs) == 4, pairs
    for p in pairs:
        assert p.overhead <= 0.40, f"{p.kernel} {p.case}: dropout adds {p.overhead:.0%} ({p.sass_off} -> {p.sass_on} SASS)"


def test_report_summary_pairs_rows_that_differ_only_in_dropout():
    """tools/report_summary.py (no compiler needed): pairs p=0.0 / p=0.1 rows of one kernel and case,
    the heuristic rows whatever their configurations, the autotuning candidates configuration by
    configuration; a dropout-on row without its twin is an error, not a silent gap."""
    def row(scenario, sass, kernel="_attn_fwd_one_tile_kernel", config=None, regs=64, heuristic=True):
        return dict(kernel=kernel, scenario=scenario, config=config or {"BLOCK_Q": 32, "num_warps": 4}, regs=regs,
                    sass_instructions=sass, spill_bytes=0, heuristic=heuristic)

    rows = [row("self 36x36 bf16 D=64 p=0.0 mask=False", 800), row("self 36x36 bf16 D=64 p=0.1 mask=False", 1000),
            row("cross 20+36 bf16 D=64 p=0.0", 1000, kernel="_attn_bwd_one_tile_kernel"),
            row("cross 20+36 bf16 D=64 p=0.1", 1500, kernel="_attn_bwd_one_tile_kernel", regs=80)]
    pairs = report_summary.dropout_overheads(rows)
    assert [(p.kernel, p.case, p.sass_off, p.sass_on, p.regs_on) for p in pairs] == [
        ("_attn_fwd_one_tile_kernel", "self 36x36 bf16 D=64 mask=False", 800, 1000, 64),
        ("_attn_bwd_one_tile_kernel", "cross 20+36 bf16 D=64", 1000, 1500, 80)]
    assert [round(p.overhead, 2) for p in pairs] == [0.25, 0.5]
    assert len(report_summary.dropout_overheads(rows, report_summary.ATTENTION_FORWARDS)) == 1
    # the table's dropout row may use another configuration: still one pair, both configurations kept
    table = [row("self 512 p=0.0", 900, kernel="_attn_bwd_dkdv_kernel", config={"num_warps": 4}),
             row("self 512 p=0.1", 800, kernel="_attn_bwd_dkdv_kernel", config={"num_warps": 8})]
    (pair,) = report_summary.dropout_overheads(table)
    assert (pair.config_off, pair.config_on) == ('{"num_warps": 4}', '{"num_warps": 8}')
    candidate = row("self 36x36 bf16 D=64 p=0.1 mask=False", 900, config={"BLOCK_Q": 64, "num_warps": 8},
                    heuristic=False)
    with pytest.raises(ValueError, match="no dropout-off row"):
        report_summary.dropout_overheads(rows + [candidate])


def _test_modules_defining_kernels() -> dict:
    """{test module path: names of the @triton.jit kernels it defines}, over kernels/tests and the
    repository's tests/ (where present)."""
    found = {}
    for folder in (KERNELS_DIR / "tests", REPO_DIR / "tests"):
        for path in sorted(folder.glob("*.py")) if folder.is_dir() else ():
            names = KERNEL_DEFINITION.findall(path.read_text())
            if names:
                found[path.resolve()] = names
    return found


@pytest.mark.skipif(not _cuda_backend_available(), reason="Triton's CUDA backend is not installed")
def test_every_kernel_the_tests_define_builds_for_sm90(tmp_path):
    """Every kernel a test module defines is launched by its tests, and each launch (as specialised
    there) builds for sm_90: a kernel only Triton's interpreter accepts fails here, on a CPU, and
    not on the first GPU run. The modules' tests run in a subprocess with the launch recorder."""
    defined = _test_modules_defining_kernels()
    assert any(path.name == "test_dropout_masks.py" for path in defined), defined  # the scan finds kernels
    launches = tmp_path / "launches.jsonl"
    env = _compiler_env()  # the child's conftest.py chooses the interpreter where there is no CUDA
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "launch_recorder",
                          "--record-launches", str(launches), *map(str, defined)],
                         cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = [json.loads(line) for line in launches.read_text().splitlines()]
    launched = {(Path(r["file"]).resolve(), r["kernel"]) for r in rows}
    never = [(path.name, name) for path, names in defined.items() for name in names if (path, name) not in launched]
    assert not never, f"kernels a test module defines that its tests never launch (so never built): {never}"
    build = _build_recorded(launches)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    n_test_kernels = sum(r["module"].split(".")[0] != "lxmert_kernels" for r in rows)
    assert f"{n_test_kernels} recorded variants compiled for sm_90" in build.stdout, build.stdout[-2000:]


# The first _philox_words_kernel of the tests (then in test_one_tile_and_tuning.py), which the
# interpreter ran and Triton's compiler refuses, beside the version test_dropout_masks.py has now.
PHILOX_WORDS_KERNELS = """
    import triton
    import triton.language as tl


    @triton.jit
    def philox_words_by_list_comprehension(SEED, C_4N, OUT_4N, N: tl.constexpr, ROUNDS: tl.constexpr):
        i = tl.arange(0, N)
        seed = tl.load(SEED)
        c = [tl.load(C_4N + j * N + i).to(tl.uint32) for j in tl.static_range(4)]
        words = tl.philox(seed, c[0], c[1], c[2], c[3], ROUNDS)
        for j in tl.static_range(4):
            tl.store(OUT_4N + j * N + i, words[j])


    @triton.jit
    def philox_words_written_out(SEED, C_4N, OUT_4N, N: tl.constexpr, ROUNDS: tl.constexpr):
        i = tl.arange(0, N)
        seed = tl.load(SEED)
        c0 = tl.load(C_4N + i).to(tl.uint32)
        c1 = tl.load(C_4N + N + i).to(tl.uint32)
        c2 = tl.load(C_4N + 2 * N + i).to(tl.uint32)
        c3 = tl.load(C_4N + 3 * N + i).to(tl.uint32)
        words = tl.philox(seed, c0, c1, c2, c3, ROUNDS)
        for j in tl.static_range(4):
            tl.store(OUT_4N + j * N + i, words[j])
"""


@pytest.mark.skipif(not _cuda_backend_available(), reason="Triton's CUDA backend is not installed")
def test_the_offline_build_refuses_a_kernel_only_the_interpreter_runs(tmp_path):
    """The old helper kernel built its counters with a list comprehension: the interpreter runs it,
    Triton's compiler (3.6 and 3.9) refuses it. Recorded (not run) and built as above: it fails with
    the compiler's reason, and the written-out version builds."""
    path = tmp_path / "philox_words_kernels.py"
    path.write_text(textwrap.dedent(PHILOX_WORDS_KERNELS))
    spec = importlib.util.spec_from_file_location("philox_words_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seed = torch.empty(1, dtype=torch.int64, device="meta")
    counters = torch.empty(4 * 512, dtype=torch.int32, device="meta")
    with launch_recorder.recording(run=False) as rows:
        for kernel in (module.philox_words_by_list_comprehension, module.philox_words_written_out):
            kernel[(1,)](seed, counters, counters, N=512, ROUNDS=7)
    launches = tmp_path / "launches.jsonl"
    launches.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    build = _build_recorded(launches)
    assert build.returncode == 1, build.stdout[-4000:] + build.stderr[-4000:]
    assert re.search(r"^FAIL philox_words_kernels\.philox_words_by_list_comprehension .*"
                     r"only tuple comprehensions are supported", build.stdout, re.M | re.S), build.stdout[-4000:]
    assert re.search(r"^ok   philox_words_kernels\.philox_words_written_out ", build.stdout, re.M), build.stdout[-4000:]
    assert "1 recorded variants compiled for sm_90" in build.stdout and "1 failed" in build.stdout
