"""Summarise ``compile_check.py --report`` rows: what dropout adds to each kernel, and any spills.

    python kernels/tools/compile_check.py --report | python kernels/tools/report_summary.py

Reads the JSON lines on stdin and prints two Markdown tables: per (kernel, case, configuration)
with dropout off and on, the registers and SASS instructions of both and the SASS dropout adds
(issue 15's target: at most +40% on every attention forward); then every variant that spills.
Pure Python (no Triton, no torch): ``kernels/tests/test_compile_sm90.py`` uses
:func:`dropout_overheads` on the rows it gets from its compile_check subprocess.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Iterable

ATTENTION_FORWARDS = ("_attn_fwd_one_tile_kernel", "_attn_fwd_kernel")


@dataclass(frozen=True)
class DropoutOverhead:
    """One kernel in one case and configuration, compiled with dropout off (p=0.0) and on (p=0.1)."""

    kernel: str
    case: str  # the scenario label without its "p=..." part
    config_off: str  # the configurations as sorted JSON (the heuristics table may choose another with dropout)
    config_on: str
    regs_off: int
    regs_on: int
    sass_off: int
    sass_on: int

    @property
    def overhead(self) -> float:
        """Fraction of SASS instructions dropout adds (0.25 = +25%)."""
        return self.sass_on / self.sass_off - 1


def _case(scenario: str) -> str:
    return " ".join(word for word in scenario.split() if not word.startswith("p="))


def _key(row: dict) -> tuple[str, str, str]:
    """(kernel, case, configuration); the heuristic rows of a kernel and case pair whatever their
    configurations (as shipped: the table may pick another tile or warps with dropout), the
    autotuning candidates configuration by configuration."""
    config = "heuristic" if row.get("heuristic", True) else json.dumps(row["config"], sort_keys=True)
    return row["kernel"], _case(row["scenario"]), config


def dropout_overheads(rows: Iterable[dict], kernels: tuple[str, ...] | None = None) -> list[DropoutOverhead]:
    """Pairs of rows that differ only in dropout (scenario "p=0.0" against "p=0.1", same kernel,
    case and configuration: see ``_key``), in the rows' order; ``kernels`` keeps those kernels only.
    A dropout-on row without its dropout-off twin is an error (the report would silently drop it)."""
    rows = list(rows)
    off = {_key(r): r for r in rows if "p=0.0" in r["scenario"].split()}
    out = []
    for r in rows:
        if "p=0.1" not in r["scenario"].split() or (kernels is not None and r["kernel"] not in kernels):
            continue
        key = _key(r)
        if key not in off:
            raise ValueError(f"no dropout-off row for {key} (run the report without --quick)")
        o = off[key]
        out.append(DropoutOverhead(r["kernel"], key[1], json.dumps(o["config"], sort_keys=True),
                                   json.dumps(r["config"], sort_keys=True), o["regs"], r["regs"],
                                   o["sass_instructions"], r["sass_instructions"]))
    return out


def main() -> int:
    rows = [json.loads(line) for line in sys.stdin if line.startswith("{")]
    pairs = dropout_overheads([r for r in rows if r.get("heuristic", True)])  # as shipped
    print("| kernel | case | configuration p=0 / 0.1 | regs p=0 / 0.1 | SASS p=0 / 0.1 | dropout adds |")
    print("|---|---|---|---|---|---|")
    for p in pairs:
        configs = [", ".join(f"{k}={v}" for k, v in json.loads(c).items()) for c in (p.config_off, p.config_on)]
        config = configs[0] if configs[0] == configs[1] else " / ".join(configs)
        print(f"| `{p.kernel}` | {p.case} | {config} | {p.regs_off} / {p.regs_on} | {p.sass_off} / {p.sass_on} "
              f"| {p.overhead:+.0%} |")
    spills = [r for r in rows if r.get("spill_bytes")]
    print(f"\n{len(rows)} variants, " + (f"{len(spills)} spill:" if spills else "none spills"))
    for r in spills:
        print(f"- `{r['kernel']}` {r['scenario']} {r['config']} ({'heuristic' if r.get('heuristic') else 'candidate'}): "
              f"{r['regs']} registers, {r['spill_bytes']} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
