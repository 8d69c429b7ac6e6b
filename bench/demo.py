"""Time `redifine demo --quick` and the full demo against their limits (2 and 10 minutes on 2 CPU cores).

    python bench/demo.py [--threads 2] [--out DIR] [--only quick|full] [--json FILE]

Runs each demo once on the CPU with ``--threads`` torch threads (pin the process to two cores with ``taskset -c 0,1``
for an honest reading on a bigger machine) and prints the minutes and the ratio to each limit (< 1 passes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

LIMITS_MIN = {"quick": 2.0, "full": 10.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="folder for the two runs (default: a temp folder)")
    ap.add_argument("--only", choices=sorted(LIMITS_MIN), default=None)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the limits are CPU limits
    import torch

    torch.set_num_threads(args.threads)
    from redifine_core.toy.demo import run_demo

    out = args.out or Path(tempfile.mkdtemp(prefix="redifine_bench_demo_"))
    results = {}
    for name in ([args.only] if args.only else ["quick", "full"]):
        t0 = time.perf_counter()
        report = run_demo(out / name, quick=(name == "quick"), seeds=(0,), model=args.model)
        minutes = (time.perf_counter() - t0) / 60
        ratio = minutes / LIMITS_MIN[name]
        results[name] = {"minutes": round(minutes, 3), "limit_minutes": LIMITS_MIN[name], "ratio": round(ratio, 3),
                         "report": str(report)}
        print(f"{name:>5}: {minutes:6.2f} min  limit {LIMITS_MIN[name]:4.1f} min  ratio {ratio:.2f}  "
              f"{'PASS' if ratio <= 1 else 'OVER'}  ({report})", flush=True)
    print(f"threads={torch.get_num_threads()} cpus_visible={len(os.sched_getaffinity(0))}")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "results": results}, indent=2))
    return 0 if all(r["ratio"] <= 1 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
