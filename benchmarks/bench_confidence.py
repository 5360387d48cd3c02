"""False-alarm and detection rates of the model-confidence signal alone, on synthetic sections.

The same sections as benchmarks/bench_qc.py (in-domain of every counterstain and pixel size
0.25-2 µm/px; each out-of-domain kind of ``histo.qc.synthetic``), segmented as the pipeline
does; the signal ``model.unsure_share`` is judged against the model's stored reference
(``histo qc-reference``). Limits are chosen on the ``validation`` seeds; ``test`` is held out.

    .venv/bin/python benchmarks/bench_confidence.py [--split test] [--n 8] [--model NAME|DIR]
        [--csv values.csv] [--workers 2] [--kinds KIND...] [--reference ref.json]

Prints one row per kind: sections, pass / warn / fail %, flagged %, the median and largest
unsure share, and the mean wall seconds per section (segmentation included).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

from benchmarks.bench_qc import MIN_FIELD_UM, _plan
from histo.qc._confidence import reference_low_margin, slide_summary, unsure_share_signal
from histo.qc.synthetic import KINDS, make_case

_MODEL = {}


def _model(name: str):
    if name not in _MODEL:
        import torch

        from histo.segment import load_model

        torch.set_num_threads(1)
        _MODEL[name] = load_model(name)
    return _MODEL[name]


def _run_case(job: dict) -> dict:
    size = max(job["size"], round(MIN_FIELD_UM / job["px"]))
    case = make_case(job["kind"], job["seed"], size, job["px"], counterstain=job["counterstain"])
    model = _model(job["model"])
    t0 = time.perf_counter()
    summary = slide_summary(case.image, case.stated_pixel_size_um, model)
    row = {
        **case.describe(),
        "seconds": round(time.perf_counter() - t0, 3),
        "tissue_px": summary.tissue_pixels,
        "unsure_share": round(summary.unsure_share(job["low_margin"]), 4),
        "unsure_0.3": round(summary.unsure_share(0.3), 4),
        "unsure_0.7": round(summary.unsure_share(0.7), 4),
        "mean_margin": round(summary.mean_margin(), 4),
    }
    counts = summary.class_histograms.sum(axis=1)
    for c, share in enumerate(summary.class_unsure_shares()):
        row[f"class{c}_px"] = int(counts[c])
        row[f"class{c}_unsure"] = round(share, 4) if math.isfinite(share) else ""
    return row


def _table(rows: list[dict], reference: dict) -> list[str]:
    lines = [
        "| kind | sections | pass % | warn % | fail % | flagged % | median share | max share "
        "| s/section |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        status = [_status(r, reference) for r in mine]
        pct = {s: round(100 * status.count(s) / len(mine)) for s in ("pass", "warn", "fail")}
        shares = [r["unsure_share"] for r in mine]
        secs = statistics.fmean(r["seconds"] for r in mine)
        lines.append(
            f"| {kind} | {len(mine)} | {pct['pass']} | {pct['warn']} | {pct['fail']} | "
            f"{pct['warn'] + pct['fail']} | {statistics.median(shares):.3f} | "
            f"{max(shares):.3f} | {secs:.2f} |"
        )
    return lines


def _status(row: dict, reference: dict) -> str:
    return unsure_share_signal(row["unsure_share"], reference).status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--n", type=int, default=8, help="sections per kind (x3 in-domain)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--model", default="default")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kinds", nargs="+", choices=KINDS)
    parser.add_argument("--csv", help="write one row per section")
    parser.add_argument("--reference", help="a reference JSON file instead of the model's own")
    args = parser.parse_args(argv)

    from histo.segment.registry import locate_model, read_qc_reference

    if args.reference:
        with open(args.reference) as f:
            reference = json.load(f)
    else:
        reference = read_qc_reference(locate_model(args.model))
    if reference is None:
        parser.error(f"model {args.model!r} has no qc_reference: run histo qc-reference first")
    jobs = [
        dict(j, size=args.size, model=args.model, low_margin=reference_low_margin(reference))
        for j in _plan(args.split, args.n)
        if not args.kinds or j["kind"] in args.kinds
    ]
    rows = []
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        for row in pool.map(_run_case, jobs):
            rows.append(row)
            print(", ".join(f"{k}={v}" for k, v in list(row.items())[:10]), flush=True)
    if args.csv:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
    print(
        f"reference: unsure share (margin < {reference['low_margin']}) at most "
        f"{reference['max_share']:.3f} in-domain; warn above {reference['warn_above']}, "
        f"fail above {reference['fail_above']}"
    )
    print("\n".join(_table(rows, reference)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
