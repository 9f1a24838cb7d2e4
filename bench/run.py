"""Runs every benchmark and prints one table of optserve against its same-run baselines, then the
detail tables. Figures go into BENCHMARKS.md with this command.

    python bench/run.py [--quick] [--pin] [--runs 3]

--quick uses smaller sizes (for a smoke run); the reported figures use the defaults.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import apply
import common
import h2d
import memory
import roundtrip
import transport
import wire
from common import machine, table


def _ratio(text: str) -> float:
    return float(re.match(r"([0-9.]+)x", text).group(1))


def one_run(q: bool) -> tuple[list[dict], list[tuple[str, str]]]:
    """Every benchmark once: (summary rows, detail tables)."""
    details: list[tuple[str, str]] = []
    summary: list[dict] = []

    rows = transport.measure([int(1e6), int(40e6)] if q else [int(1e6), int(40e6), int(400e6)], 4 << 20)
    details.append(("transport (push and pull vs raw grpcio streaming, 4 MiB chunks)", table(rows, transport.COLUMNS)))
    for r in rows:
        if r["size"] in ("40 MB", "400 MB"):
            for what in ("push", "pull"):
                summary.append(
                    {
                        "measure": f"{what} {r['size']} float32",
                        "optserve": f"{r[f'{what} GB/s']} GB/s",
                        "baseline": f"raw grpcio {r[f'raw {what} GB/s']} GB/s (raw + one copy "
                        f"{r[f'raw+copy {what} GB/s']} GB/s: ours {r[f'{what} vs raw+copy']} of that)",
                        "ratio": r[f"{what} ratio"],
                        "target": ">= 0.9x",
                    }
                )
            summary.append(
                {
                    "measure": f"pull {r['size']} float32 into the previous pull's arrays (out=)",
                    "optserve": f"{r['pull (out=) GB/s']} GB/s",
                    "baseline": f"raw grpcio {r['raw pull GB/s']} GB/s",
                    "ratio": r["pull (out=) ratio"],
                    "target": ">= 0.9x",
                }
            )

    rows = apply.measure(int(2e6) if q else int(10e6), ["sgd", "adam", "chain"])
    details.append(("apply (server step vs in-process jitted optax with donation)", table(rows, apply.COLUMNS)))
    for r in rows:
        summary.append(
            {
                "measure": f"apply {r['rule']} {r['params']}",
                "optserve": f"{r['server step ms']} ms",
                "baseline": f"optax {r['optax step ms']} ms",
                "ratio": r["ratio"],
                "target": "<= 1.1x",
            }
        )

    rows = roundtrip.measure(int(2e6) if q else int(10e6))
    details.append(("round trips", table(rows, roundtrip.COLUMNS)))
    summary.extend(dict(r) for r in rows if r["target"])

    rows = wire.measure(int(2e6) if q else int(10e6))
    details.append(("wire dtypes (push)", table(rows, wire.COLUMNS)))
    bf16 = next(r for r in rows if r["wire dtype"] == "bfloat16")
    summary.append(
        {
            "measure": "push, bfloat16 on the wire",
            "optserve": f"{bf16['effective GB/s (as float32)']} GB/s effective",
            "baseline": f"float32 {rows[0]['effective GB/s (as float32)']} GB/s",
            "ratio": bf16["vs float32"],
            "target": ">= 1.8x",
        }
    )
    native = rows[-1]
    summary.append(
        {
            "measure": "push, bfloat16 gradients (no client-side conversion)",
            "optserve": f"{native['effective GB/s (as float32)']} GB/s effective",
            "baseline": f"float32 {rows[0]['effective GB/s (as float32)']} GB/s",
            "ratio": native["vs float32"],
            "target": ">= 1.8x",
        }
    )

    rows = memory.measure(int(20e6) if q else int(100e6))
    details.append(("server memory while receiving a gradient", table(rows, memory.COLUMNS)))
    r = rows[0]
    summary.append(
        {
            "measure": f"peak server memory, {r['gradient G']} gradient (adam)",
            "optserve": f"{r['model peak during push']} (= state + {r['= state +']})",
            "baseline": f"params + state {r['params + state']}; runtime {r['server runtime']} excluded",
            "ratio": r["= state +"].replace(" G", "x"),
            "target": "<= 1.2x (state + 1.2 G)",
        }
    )

    details.append(("host to device, 40 MB", table(h2d.measure(40), h2d.COLUMNS)))
    return summary, details


def _met(ratio: float, target: str) -> str:
    limit = float(re.search(r"([0-9.]+)x", target).group(1))
    return "yes" if (ratio >= limit if target.startswith(">=") else ratio <= limit) else "no"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pin", action="store_true", help="server on CPU 0, client on CPU 1 (see common.PIN)")
    ap.add_argument("--runs", type=int, default=1, help="repeat everything; report each ratio's median and range")
    args = ap.parse_args()
    if args.pin:
        common.PIN = True
    common.pin_client()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs = [one_run(args.quick) for _ in range(args.runs)]
    summary = []
    for i, row in enumerate(runs[-1][0]):  # figures of the last run, ratios over all runs
        ratios = sorted(_ratio(run[0][i]["ratio"]) for run in runs)
        median = statistics.median(ratios)
        spread = f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ""
        summary.append({**row, "ratio": f"{median:.2f}x{spread}", "met": _met(median, row["target"])})
    print(f"# optserve benchmarks, {started}: {machine()}; {args.runs} run(s), ratio = median (range)\n")
    print(table(summary, ["measure", "optserve", "baseline", "ratio", "target", "met"]))
    for title, text in runs[-1][1]:
        print(f"\n## {title} (last run)\n\n{text}")


if __name__ == "__main__":
    main()
