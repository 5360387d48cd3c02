"""Post-processing constants of ``histo.segment.instances``, swept on the validation seeds.

One constant at a time around the values of the first session (seed level 0.25, smallest
osteoclast 120 µm², smallest lacuna 12 µm², osteoclast within 3 µm of bone). The network's
tile scores are computed once and memoised (keyed by the tile's bytes), so every setting sees
the same network outputs; ~20 s per setting after the first. Writes a tab-separated table:

    .venv/bin/python models/evaluation/validation/sweep_postprocessing.py > sweep.tsv
"""

from __future__ import annotations

import hashlib
import time

import histo.segment.instances as inst
from histo.evaluate import VALIDATION_SEED_BASE, evaluate
from histo.segment import NetworkSegmenter

BASE = {
    "CENTRE_SEED_LEVEL": 0.25,
    "MIN_OSTEOCLAST_AREA_UM2": 120.0,
    "MIN_OSTEOCYTE_AREA_UM2": 12.0,
    "OSTEOCLAST_BONE_CONTACT_UM": 3.0,
}
SWEEP = {
    "CENTRE_SEED_LEVEL": (0.15, 0.35, 0.45),
    "MIN_OSTEOCLAST_AREA_UM2": (80.0, 160.0, 220.0),
    "MIN_OSTEOCYTE_AREA_UM2": (8.0, 16.0, 18.0, 20.0, 24.0, 28.0),
    "OSTEOCLAST_BONE_CONTACT_UM": (2.0, 5.0),
}
KEYS = (
    "osteoclast F1",
    "osteocyte F1",
    "N.Oc/B.Pm rel. error",
    "N.Ot/B.Ar rel. error",
    "Oc.S/BS abs. error",
    "max N.Oc/B.Pm on oc-poor",
    "phenotype accuracy",
)


def main() -> None:
    memo: dict = {}
    predict = NetworkSegmenter.predict_scores

    def memoised(self, rgb):
        key = hashlib.blake2b(rgb.tobytes(), digest_size=16).digest() + repr(rgb.shape).encode()
        if key not in memo:
            memo[key] = predict(self, rgb)
        return memo[key].copy()

    NetworkSegmenter.predict_scores = memoised
    variants = [{}] + [{k: v} for k, vs in SWEEP.items() for v in vs]
    print("setting\t" + "\t".join(KEYS) + "\tphenotype wrong", flush=True)
    for var in variants:
        for k, v in {**BASE, **var}.items():
            setattr(inst, k, v)
        t0 = time.perf_counter()
        rep = evaluate(
            models=("default",), cache_dir="runs/val-cache", seed_base=VALIDATION_SEED_BASE
        )
        s = rep["summary"]["default"]
        name = ",".join(f"{k}={v}" for k, v in var.items()) or "first-session values"
        cells = "\t".join(f"{s[k]:.4f}" for k in KEYS)
        print(f"{name}\t{cells}\t{s['phenotype wrong']}  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
