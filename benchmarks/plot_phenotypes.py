"""Scatter N.Oc/B.Pm against BV/TV for a synthetic cohort, coloured by true phenotype.

Measures true class maps of ``--n`` synthetic sections per phenotype (768 px at 1 µm/px, fresh
seeds), calls the phenotype with the default reference ranges, draws the thresholds, and writes
``docs/phenotypes.png``. Prints the call accuracy.

    .venv/bin/python benchmarks/plot_phenotypes.py [--n 12] [--out docs/phenotypes.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

from histo.measure import measure  # noqa: E402
from histo.phenotype import ReferenceRanges, call_phenotype  # noqa: E402
from histo.synth import make_section  # noqa: E402

COLOURS = {"normal": "#2b8cbe", "oc-rich": "#e6550d", "oc-poor": "#636363"}


def cohort(n: int, size: int = 768, pixel_size_um: float = 1.0, first_seed: int = 5000):
    """(phenotype, seed, indices) for ``n`` sections of each phenotype."""
    for k, phenotype in enumerate(COLOURS):
        for i in range(n):
            seed = first_seed + 1000 * k + i
            s = make_section(phenotype, size, pixel_size_um, seed=seed)
            m = measure(
                s.class_map,
                pixel_size_um,
                osteoclast_labels=s.osteoclast_labels,
                osteocyte_labels=s.osteocyte_labels,
            )
            yield phenotype, seed, m.indices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12, help="sections per phenotype (12)")
    parser.add_argument("--out", default=str(Path(__file__).parent.parent / "docs/phenotypes.png"))
    args = parser.parse_args()

    ranges = ReferenceRanges()
    points = {p: ([], []) for p in COLOURS}
    right = total = 0
    for phenotype, seed, ind in cohort(args.n):
        call = call_phenotype(ind, ranges)
        total += 1
        right += call.phenotype == phenotype
        if call.phenotype != phenotype:
            print(f"  wrong: {phenotype} seed {seed} called {call.phenotype}: {call.evidence}")
        points[phenotype][0].append(ind["BV/TV"])
        points[phenotype][1].append(ind["N.Oc/B.Pm"])
    print(f"phenotype calls from true class maps: {right}/{total} right")

    fig = Figure(figsize=(6.4, 4.6), dpi=120)
    ax = fig.add_subplot()
    for phenotype, (x, y) in points.items():
        ax.scatter(
            x,
            y,
            s=28,
            color=COLOURS[phenotype],
            label=f"{phenotype} (n={len(x)})",
            edgecolor="white",
            linewidth=0.5,
        )
    ax.axvline(ranges.bv_tv_upper, color="k", linestyle="--", linewidth=0.8)
    ax.axhline(ranges.n_oc_b_pm_lower, color="k", linestyle=":", linewidth=0.8)
    ax.text(
        ranges.bv_tv_upper + 0.5,
        ax.get_ylim()[1] * 0.95,
        f"BV/TV {ranges.bv_tv_upper:g}%",
        va="top",
        fontsize=8,
    )
    ax.text(1, ranges.n_oc_b_pm_lower + 0.3, f"N.Oc/B.Pm {ranges.n_oc_b_pm_lower:g}/mm", fontsize=8)
    ax.set_xlim(0, 80)
    ax.set_xlabel("BV/TV (%)")
    ax.set_ylabel("N.Oc/B.Pm (/mm)")
    ax.set_title(f"Synthetic cohort, true class maps: {right}/{total} calls right", fontsize=10)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
