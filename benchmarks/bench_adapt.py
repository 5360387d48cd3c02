"""Adapting the network to a lab's stain: ``histo finetune`` on a few labelled fields.

A "lab domain" the shipped network never saw is rendered by :mod:`histo.qc.synthetic`'s dyes
(same synthetic anatomy, other stains): ``aniline-blue`` (aniline-blue counterstain) and
``trichrome`` (Masson: aniline-blue bone, fuchsin-red cytoplasm, iron-hematoxylin nuclei).
For each shift, 1-3 training fields (2048² at 1 µm/px) are labelled fully or with scribbles
(strokes drawn inside each class of the truth, about 1 % of the pixels), written as slides with
``NAME.classes.tif`` beside them and fine-tuned with ``histo finetune`` (default budget, in a
child process: its wall time and peak RSS are measured). Every model is then scored on held-out
fields of the shift (bone and marrow Dice, osteoclast and osteocyte F1 at IoU 0.5, phenotype
calls against the calls of the true map) and on in-domain test slides of
:func:`histo.evaluate.evaluate` (forgetting).

    .venv/bin/python benchmarks/bench_adapt.py [--shifts aniline-blue trichrome]
        [--variants full-3 scribbles-3 full-1] [--minutes 5] [--test 6] [--in-domain 6]
        [--replay-share R] [--set FIELD=VALUE ...] [--work DIR] [--json OUT]

``--set`` passes any :class:`histo.finetune.FinetuneConfig` setting to ``histo finetune`` (the
experiments of docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from histo.classes import BONE, MARROW, UNLABELLED

#: generator seeds of the adaptation benchmark: training fields, then held-out test fields
TRAIN_SEED = 600_000
TEST_SEED = 600_100
SHIFTS = ("aniline-blue", "trichrome")
VARIANTS = ("full-3", "scribbles-3", "full-1")
PHENOTYPES = ("normal", "oc-rich", "oc-poor")


@dataclass
class DomainField:
    """A field of the shifted domain with its truth."""

    image: np.ndarray
    class_map: np.ndarray
    osteoclasts: np.ndarray
    osteocytes: np.ndarray
    phenotype: str


def domain_field(shift: str, seed: int, size: int, phenotype: str) -> DomainField:
    """A field rendered with the dyes of ``shift`` (histo.qc.synthetic's out-of-domain dyes)."""
    from histo.qc import synthetic as qs
    from histo.synth._field import build_field
    from histo.synth._render import render, sample_style

    rng = np.random.default_rng(seed)
    style = sample_style(rng, "hematoxylin")
    fld = build_field(phenotype, (size, size), 1.0, rng, {})
    if shift == "trichrome":
        image = qs._trichrome(fld, style, rng)
    elif shift == "aniline-blue":
        v = qs._unit_jitter(rng, qs.ANILINE_BLUE_OD, qs.DYE_SD)
        image = render(fld, dict(style, counterstain="fast-green", v_counter=v), rng)
    else:
        raise ValueError(f"unknown shift {shift!r}")
    return DomainField(image, fld.class_map, fld.osteoclast_labels, fld.osteocyte_labels, phenotype)


def scribbles(class_map: np.ndarray, seed: int, strokes: int = 40, length: int = 80) -> np.ndarray:
    """A few strokes per class inside the truth (3 px wide, kept 1 px inside each class),
    255 elsewhere: what a user paints in a minute or two."""
    rng = np.random.default_rng(seed)
    out = np.full(class_map.shape, UNLABELLED, np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    for c in np.unique(class_map):
        inside = cv2.erode((class_map == c).astype(np.uint8), kernel)
        pts = np.argwhere(inside)
        if not len(pts):
            pts = np.argwhere(class_map == c)
            inside = (class_map == c).astype(np.uint8)
        canvas = np.zeros(class_map.shape, np.uint8)
        for _ in range(strokes):
            y, x = pts[int(rng.integers(len(pts)))]
            a = rng.uniform(0, np.pi)
            dy, dx = np.sin(a) * length / 2, np.cos(a) * length / 2
            p0 = (int(x - dx), int(y - dy))
            p1 = (int(x + dx), int(y + dy))
            cv2.line(canvas, p0, p1, 1, 3)
        out[(canvas > 0) & (inside > 0)] = c
    return out


def write_labelled(folder: Path, name: str, image: np.ndarray, labels: np.ndarray) -> Path:
    """``NAME.ome.tif`` and ``NAME.classes.tif`` at 1 µm/px, as the napari plugin saves them."""
    from histo.synth import write_pyramidal_tiff

    folder.mkdir(parents=True, exist_ok=True)
    slide = folder / f"{name}.ome.tif"
    write_pyramidal_tiff(slide, image, 1.0)
    write_pyramidal_tiff(folder / f"{name}.classes.tif", labels, 1.0, label=True)
    return slide


@dataclass
class _Truth:
    class_map: np.ndarray
    osteoclast_labels: np.ndarray
    osteocyte_labels: np.ndarray


def _call(class_map, osteoclasts, osteocytes, image) -> str:
    from histo.evaluate import _call, _measure

    return _call(_measure(class_map, 1.0, osteoclasts, osteocytes, image).indices)


def score_domain(model: str, fields: list[DomainField]) -> dict:
    """Bone and marrow Dice (pooled), osteoclast and osteocyte F1 (IoU 0.5), calls right
    (against the phenotype the field was generated as). ``model="truth"`` scores the true
    maps: the floor of the calls."""
    from histo.evaluate import match_objects
    from histo.segment import load_model, segment_slide

    seg = None if model == "truth" else load_model(model, device="cpu")
    inter, sizes = np.zeros(5), np.zeros(5)
    objects = {"osteoclast": np.zeros(3), "osteocyte": np.zeros(3)}
    calls_right = 0
    for f in fields:
        if seg is None:
            res = _Truth(f.class_map, f.osteoclasts, f.osteocytes)
        else:
            res = segment_slide(f.image, seg, tile_px=768, overlap_px=64)
        cm = np.asarray(res.class_map)
        for c in range(5):
            a, b = cm == c, f.class_map == c
            inter[c] += (a & b).sum()
            sizes[c] += a.sum() + b.sum()
        objects["osteoclast"] += match_objects(f.osteoclasts, res.osteoclast_labels)
        objects["osteocyte"] += match_objects(f.osteocytes, res.osteocyte_labels)
        got = _call(cm, res.osteoclast_labels, res.osteocyte_labels, f.image)
        calls_right += got == f.phenotype
    dice = 2 * inter / np.maximum(sizes, 1)
    f1 = {k: 2 * v[0] / max(1.0, 2 * v[0] + v[1] + v[2]) for k, v in objects.items()}
    return {
        "bone_dice": float(dice[BONE]),
        "marrow_dice": float(dice[MARROW]),
        "osteoclast_f1": float(f1["osteoclast"]),
        "osteocyte_f1": float(f1["osteocyte"]),
        "calls_right": f"{calls_right}/{len(fields)}",
    }


def score_in_domain(model: str, n: int) -> dict:
    """Bone Dice and osteoclast F1 on the first ``n`` in-domain test slides of histo.evaluate."""
    from histo.evaluate import evaluate

    report = evaluate([model], n_slides=n, field_um=800.0, device="cpu")
    row = report["summary"][model]
    return {
        "bone_dice": float(row["bone Dice"]),
        "osteoclast_f1": float(row["osteoclast F1"]),
        "osteocyte_f1": float(row["osteocyte F1"]),
        "calls": float(row["phenotype accuracy"]),
    }


def run_finetune(
    data: Path,
    out: Path,
    minutes: float,
    seed: int,
    max_steps: int | None = None,
    replay_share: float | None = None,
    settings: list[str] = (),
) -> dict:
    """``histo finetune`` in a child process: wall and CPU time, peak RSS (MB), steps, val Dice.

    The CPU time (user + system of the child) is what the run needs of the machine: on a
    loaded machine the wall time says more about the other processes than about histo.
    """
    cmd = [sys.executable, "-m", "histo", "finetune", str(data), "--out", str(out)]
    cmd += ["--minutes", str(minutes), "--seed", str(seed)]
    if max_steps:
        cmd += ["--max-steps", str(max_steps)]
    if replay_share is not None:
        cmd += ["--replay-share", str(replay_share)]
    for pair in settings:
        cmd += ["--set", pair]
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime - usage0.ru_utime - usage0.ru_stime
    meta = json.loads((out / "model.json").read_text())
    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "steps": meta["steps"],
        "best_step": meta["best_step"],
        "val_mean_dice": round(meta["validation"]["mean_dice"], 3),
        "labelled_share": round(
            sum(meta["labelled_px"].values()) / sum(_area(d) for d in meta["data"]), 4
        ),
    }


def _area(record: dict) -> int:
    """Pixels of a field (its class map's size) from its model.json record."""
    import tifffile

    with tifffile.TiffFile(record["class_map"]) as tf:
        h, w = tf.series[0].levels[0].shape[:2]
    return h * w


def step_cost(trainable: str, repeat: int = 4) -> float:
    """Median wall seconds of one optimiser step (batch 8 of 192², the shipped network) when
    ``trainable`` layers learn: what the choice saves per step."""
    import torch
    from safetensors.torch import load_file

    from histo.finetune import _frozen_modules
    from histo.segment.network import HistoUNet, NetworkConfig
    from histo.segment.registry import locate_model
    from histo.train import TrainConfig, segmentation_loss

    net = HistoUNet(NetworkConfig())
    net.load_state_dict(load_file(str(locate_model("default").weights)))
    frozen = {id(p) for m in _frozen_modules(net, trainable) for p in m.parameters()}
    for p in net.parameters():
        p.requires_grad_(id(p) not in frozen)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 192, 192, generator=gen)
    y = torch.randint(0, 5, (8, 192, 192), generator=gen)
    z = torch.zeros(8, 192, 192)
    times = []
    for _ in range(repeat + 1):
        t = time.perf_counter()
        loss, _ = segmentation_loss(net(x), y, z, TrainConfig())
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=SHIFTS)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument(
        "--max-steps", type=int, default=None, help="a step budget instead (loaded machines)"
    )
    parser.add_argument("--replay-share", type=float, default=None, help="histo finetune's")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="histo finetune's"
    )
    parser.add_argument(
        "--skip-shipped", action="store_true", help="only the fine-tuned models' rows"
    )
    parser.add_argument("--size", type=int, default=2048, help="training field side (px)")
    parser.add_argument("--test", type=int, default=6, help="held-out fields per shift")
    parser.add_argument("--test-size", type=int, default=1024)
    parser.add_argument("--in-domain", type=int, default=6, help="in-domain test slides")
    parser.add_argument("--work", default=None, help="keep the data and models here")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument(
        "--step-cost", action="store_true", help="only time one step per --trainable choice"
    )
    args = parser.parse_args(argv)
    if args.step_cost:
        for trainable in ("all", "decoder", "head"):  # interleaved, twice
            print(trainable, f"{step_cost(trainable):.2f} s/step", flush=True)
        for trainable in ("all", "decoder", "head"):
            print(trainable, f"{step_cost(trainable):.2f} s/step", flush=True)
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-adapt-"))
    rows = []
    shipped_in = {}
    if args.in_domain and not args.skip_shipped:
        shipped_in = score_in_domain("default", args.in_domain)
    for shift in args.shifts:
        rows += _bench_shift(shift, args, work, shipped_in)
    _print(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def _bench_shift(shift: str, args, work: Path, shipped_in: dict) -> list[dict]:
    """The shipped model and each variant's fine-tuned model on one shift."""
    k = SHIFTS.index(shift)
    test = [
        domain_field(shift, TEST_SEED + 10 * k + i, args.test_size, PHENOTYPES[i % 3])
        for i in range(args.test)
    ]
    train = [
        domain_field(shift, TRAIN_SEED + 10 * k + i, args.size, PHENOTYPES[i % 3]) for i in range(3)
    ]
    rows = []
    if not args.skip_shipped:
        rows.append({"shift": shift, "model": "truth map", **score_domain("truth", test)})
        rows.append({"shift": shift, "model": "shipped", **score_domain("default", test)})
        rows[1].update({f"in_{key}": v for key, v in shipped_in.items()})
        print(json.dumps(rows), flush=True)
    for variant in args.variants:
        kind, n = variant.split("-")
        data = work / shift / variant
        for i, f in enumerate(train[: int(n)]):
            labels = f.class_map if kind == "full" else scribbles(f.class_map, i)
            write_labelled(data, f"field{i}", f.image, labels)
        model = work / shift / f"model-{variant}"
        row = {
            "shift": shift,
            "model": variant,
            "settings": " ".join(args.set),
            **run_finetune(
                data, model, args.minutes, 0, args.max_steps, args.replay_share, args.set
            ),
        }
        row.update(score_domain(str(model), test))
        if args.in_domain:
            row.update(
                {f"in_{key}": v for key, v in score_in_domain(str(model), args.in_domain).items()}
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _print(rows: list[dict]) -> None:
    keys = ["shift", "model", "bone_dice", "marrow_dice", "osteoclast_f1", "osteocyte_f1"]
    keys += ["calls_right", "in_bone_dice", "in_osteoclast_f1", "in_osteocyte_f1", "in_calls"]
    keys += ["wall_s", "cpu_s", "steps", "peak_rss_mb"]
    keys += ["labelled_share"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        cells = [r.get(k, "") for k in keys]
        print(
            "| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells) + " |"
        )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
