"""A synthetic per-seed table of the schedule study, for the analysis and CLI tests."""

from __future__ import annotations

import random

from redifine_core.toy import study_analysis as sa

SEEDS = range(8)


def lane(rows, ds, method, seed, fid, fidelity, hf=0.1, lap=1.0, hf0=None, lap0=None, iterations=6):
    for i in range(iterations):
        rows.append({"dataset": ds, "method": method, "seed": seed, "iteration": i, "fid_ref": fid(i),
                     "fidelity": fidelity, "hf_share": hf0 if (i == 0 and hf0 is not None) else hf,
                     "laplacian_var": lap0 if (i == 0 and lap0 is not None) else lap})


def synthetic_table(sd_like=("a", "b"), reading_offsets=None, noise=0.02):
    """Datasets whose best constant is cfg-2.5; readings' FID endpoints = best + offset (relative) + noise."""
    rng = random.Random(0)
    reading_offsets = reading_offsets or {"redifine_decay": 0.6, "redifine_rising": 0.0,
                                          "redifine_alternate": 0.02, "redifine_chain": 0.3}
    rows = []
    for ds in ("a", "b", "c"):
        rows.append({"dataset": ds, "method": sa.REFERENCE, "seed": 0, "iteration": 0, "fid_ref": 0.0,
                     "fidelity": 1.0, "hf_share": 0.1, "laplacian_var": 1.0})
        soft = ds in sd_like
        for s in SEEDS:
            e = rng.gauss(0, noise)
            for c, base in (("cfg-1", 1.6), ("cfg-1.5", 1.3), ("cfg-2.5", 1.0), ("cfg-4", 1.2), ("cfg-7.5", 1.8)):
                hf0 = 0.05 if (c == "cfg-1") == soft else 0.15
                hf_last = 0.06 if c == "cfg-1" else (0.2 if c == "cfg-7.5" else 0.1)
                lap_last = 0.6 if c == "cfg-1" else (1.5 if c == "cfg-7.5" else 1.0)
                lane(rows, ds, c, s, lambda i, b=base, e=e: b + e + 0.01 * i, 0.95, hf=hf_last, lap=lap_last,
                      hf0=hf0, lap0=10 * hf0)
            for r, off in reading_offsets.items():
                jitter = rng.gauss(0, noise)
                lane(rows, ds, r, s, lambda i, o=off, e=e, j=jitter: 1.0 * (1 + o) + e + j + 0.01 * i, 0.95)
    return rows
