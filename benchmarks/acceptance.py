"""The project's acceptance bars for `chopgrad bench --quick`, checked on the results.json it writes.

    chopgrad bench --quick --out bench_out
    python benchmarks/acceptance.py bench_out/results.json

The bars are evaluated on the largest size measured, between its shortest and longest clip:

- sliding d_trunc=1: peak memory at the longest clip / at the shortest <= 1.15 (constant in video length);
- sliding d_trunc=1 / full backprop peak memory at the longest clip <= 0.35;
- chunked d_trunc=1 / full backprop time per step <= 1.1 at every clip length;
- correct per-step checkpointing runs (or runs out of memory) at every configuration.

A bar whose rows are missing or did not run is not evaluated. Prints one PASS / FAIL line per bar; the exit
code is 1 when any bar fails (or none could be evaluated), 0 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

CONSTANT_MEMORY_RATIO = 1.15
MEMORY_VS_FULL_RATIO = 0.35
CHUNKED_TIME_VS_FULL_RATIO = 1.1


def check_bars(rows: list[dict], d_trunc: int = 1) -> list[tuple[str, bool, str]]:
    """The acceptance bars that the rows allow to evaluate: (name, passed, measured value)."""
    out: list[tuple[str, bool, str]] = []
    if not rows:
        return out
    size = max(r["size"] for r in rows)
    frames = sorted({r["frames"] for r in rows if r["size"] == size})
    lo, hi = frames[0], frames[-1]

    def get(method, f, d=None, schedule="sliding") -> Optional[dict]:
        for r in rows:
            if (r["size"], r["frames"], r["method"]) == (size, f, method) and r["status"] == "ok" and \
                    (method != "pixel_loss" or (r["d_trunc"], r["schedule"]) == (d, schedule)):
                return r
        return None

    d_lo, d_hi, full_hi = get("pixel_loss", lo, d_trunc), get("pixel_loss", hi, d_trunc), get("full", hi)
    if d_lo and d_hi:
        ratio = d_hi["peak_bytes"] / max(d_lo["peak_bytes"], 1)
        out.append((f"sliding d={d_trunc} peak at {hi} / at {lo} frames <= {CONSTANT_MEMORY_RATIO}",
                    ratio <= CONSTANT_MEMORY_RATIO, f"{ratio:.3f}"))
    if d_hi and full_hi:
        ratio = d_hi["peak_bytes"] / max(full_hi["peak_bytes"], 1)
        out.append((f"sliding d={d_trunc} peak / full backprop peak at {hi} frames <= {MEMORY_VS_FULL_RATIO}",
                    ratio <= MEMORY_VS_FULL_RATIO, f"{ratio:.3f}"))
    for f in frames:
        chunked, full = get("pixel_loss", f, d_trunc, "chunked"), get("full", f)
        if chunked and full:
            ratio = chunked["time_s"] / full["time_s"]
            out.append((f"chunked d={d_trunc} time / full backprop time at {f} frames <= {CHUNKED_TIME_VS_FULL_RATIO}",
                        ratio <= CHUNKED_TIME_VS_FULL_RATIO, f"{ratio:.3f}"))
    checkpointed = [r for r in rows if r["method"] == "checkpoint"]
    if checkpointed:
        out.append(("correct checkpointing reported", all(r["status"] in ("ok", "oom") for r in checkpointed),
                    ", ".join(f"{r['frames']}f {r['status']}" for r in checkpointed)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="the acceptance bars of `chopgrad bench --quick`")
    parser.add_argument("results", nargs="?", default="bench_out/results.json",
                        help="results.json written by chopgrad bench (default: bench_out/results.json)")
    args = parser.parse_args(argv)
    try:
        with open(args.results) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: {args.results}: not a readable chopgrad bench results.json ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return 2
    bars = check_bars(rows)
    for name, passed, measured in bars:
        print(f"{'PASS' if passed else 'FAIL'}  {name}: {measured}")
    if not bars:
        print("no acceptance bar could be evaluated on these rows", file=sys.stderr)
    return 0 if bars and all(passed for _, passed, _ in bars) else 1


if __name__ == "__main__":
    sys.exit(main())
