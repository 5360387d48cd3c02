import json

import torch

from histo.segment.network import NetworkConfig
from histo.train import SectionPool, TrainConfig, sample_batch, segmentation_loss, train


def _tiny(**kw) -> TrainConfig:
    base = dict(
        seed=3,
        steps=12,
        batch_size=2,
        crop_px=64,
        lr=1e-2,
        pool_size=1,
        refresh_every=1000,
        field_px=128,
        max_source_px=256,
        checkpoint_every=2,
        threads=1,
        widths=[4, 8, 8, 16, 16],
    )
    base.update(kw)
    return TrainConfig(**base)


def _loss_on(weights_state, config) -> float:
    from histo.segment.network import HistoUNet

    net = HistoUNet(NetworkConfig(widths=config.widths))
    net.load_state_dict(weights_state)
    net.eval()
    pool = SectionPool(config)
    x, y, z = sample_batch(pool, config, step=10_000)
    with torch.no_grad():
        return float(segmentation_loss(net(x), y, z, config)[0])


def test_tiny_run_reduces_loss_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    from histo.segment.network import HistoUNet

    config = _tiny()
    torch.manual_seed(config.seed)
    init = HistoUNet(NetworkConfig(widths=config.widths)).state_dict()
    full = train(tmp_path / "full", config)
    assert full.steps == config.steps
    trained = load_file(str(full.weights))
    assert _loss_on(trained, config) < _loss_on(init, config)
    # interrupted at step 6, resumed: the same weights as the uninterrupted run
    part = train(tmp_path / "resumed", config, stop_at_step=6)
    assert part.steps == 6
    resumed = train(tmp_path / "resumed", None, resume=True)
    assert resumed.steps == config.steps
    again = load_file(str(resumed.weights))
    for k in trained:
        torch.testing.assert_close(again[k], trained[k])
    meta = json.loads((tmp_path / "resumed" / "model.json").read_text())
    assert meta["working_pixel_size_um"] == 1.0 and meta["sha256"] == resumed.sha256


def test_cli_train_and_export(tmp_path):
    from histo.cli import main
    from histo.segment import load_model

    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "1",
            "--crop",
            "64",
            "--pool-size",
            "1",
            "--field",
            "128",
            "--threads",
            "1",
            "--quiet",
        ]
    )
    assert rc == 0
    assert (out / "train.log").read_text().count("step 2/2") == 1
    assert main(["train", "--out", str(out), "--export-checkpoint"]) == 0
    model = load_model(out / "model.safetensors")
    assert model.working_pixel_size_um == 1.0
    # fine-tuning starts from given weights
    rc = main(
        [
            "train",
            "--out",
            str(tmp_path / "ft"),
            "--steps",
            "1",
            "--batch-size",
            "1",
            "--crop",
            "64",
            "--pool-size",
            "1",
            "--field",
            "128",
            "--threads",
            "1",
            "--quiet",
            "--init",
            str(out / "model.safetensors"),
        ]
    )
    assert rc == 0
    assert "initialised from" in (tmp_path / "ft" / "train.log").read_text()


def test_bone_surface_points_and_the_fraction_check(tmp_path):
    """Points where marrow meets bone, on a map whose only surface is the column x = 40; a
    surface fraction outside 0-0.5 is refused before any work."""
    import numpy as np
    import pytest

    from histo.classes import BONE, MARROW
    from histo.errors import HistoError
    from histo.train import bone_surface_points

    cm = np.full((64, 80), MARROW, np.uint8)
    cm[:, 40:] = BONE
    pts = bone_surface_points(cm, step=4)
    assert len(pts) == 16  # one per grid row (64 / 4)
    assert set(pts[:, 1]) == {36}  # the marrow grid column next to the bone
    assert bone_surface_points(np.full((32, 32), BONE, np.uint8)).shape == (0, 2)
    with pytest.raises(HistoError, match="surface crop fraction 0.6"):
        train(tmp_path / "bad", TrainConfig(surface_crop_fraction=0.6))
    assert not (tmp_path / "bad").exists()


def test_grown_head_keeps_the_old_channels_outputs():
    """8 outputs from 6-output weights: classes 0-4 and the centre map unchanged; the new
    classes start below the old ones (bias offset), so the argmax is the old one."""
    from histo.segment.network import HistoUNet
    from histo.train import GROWN_BIAS_OFFSET, grow_head

    torch.manual_seed(0)
    widths = [4, 8, 8, 16, 16]
    old = HistoUNet(NetworkConfig(widths=widths)).eval()
    new = HistoUNet(NetworkConfig(widths=widths, n_outputs=8)).eval()
    new.load_state_dict(grow_head(old.state_dict(), 7))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        a, b = old(x), new(x)
    torch.testing.assert_close(b[:, :5], a[:, :5])
    torch.testing.assert_close(b[:, 7], a[:, 5])
    # cartilage starts a little below bone, soft tissue a little below marrow
    torch.testing.assert_close(b[:, 5], a[:, 2] - GROWN_BIAS_OFFSET)
    torch.testing.assert_close(b[:, 6], a[:, 1] - GROWN_BIAS_OFFSET)
    assert torch.equal(b[:, :7].argmax(1), a[:, :5].argmax(1))


def test_long_bone_crops_carry_cartilage_and_soft_tissue():
    """A 7-class run's batches mix field and long-bone crops; their labels hold codes 5 and 6."""
    config = _tiny(
        n_classes=7,
        class_weights=[1, 1, 1, 2, 4, 2, 1],
        long_bone_fraction=1.0,
        long_bone_pool_size=1,
        long_bone_um=[1500.0, 1000.0],
        long_bone_max_source_px=800,
        batch_size=6,
        crop_px=128,
    )
    pool = SectionPool(config)
    long_bone = SectionPool(config, long_bone=True)
    assert long_bone.sections[0].meta["anatomy"] == "long-bone"
    codes = set()
    for step in range(3):
        _, y, _ = sample_batch(pool, config, step, long_bone)
        codes |= set(torch.unique(y).tolist())
    assert {5, 6} <= codes


def test_long_bone_sections_no_finer_than_the_floor():
    """With a floor on the long-bone source pixel size, every pool section is drawn at or
    above it (and within the range); without it, some of the same ids fall below."""
    from histo.train import long_bone_spec

    floored = TrainConfig(seed=3, long_bone_min_source_px_um=1.0)
    sizes = [long_bone_spec(floored, i)["source_pixel_size_um"] for i in range(40)]
    assert min(sizes) >= 1.0 and max(sizes) <= floored.max_source_pixel_size_um
    free = [long_bone_spec(TrainConfig(seed=3), i)["source_pixel_size_um"] for i in range(40)]
    assert min(free) < 1.0


def test_dice_leaves_out_classes_absent_from_the_batch():
    """Uniform scores on a batch that is all marrow: the Dice term is marrow's alone,
    1 - (2 P/n + 1) / (P/n + P + 1) with P pixels and n classes; the six absent classes,
    each near 1, would otherwise lift the mean towards 1."""
    config = TrainConfig(n_classes=7, class_weights=[1.0] * 7)
    h = w = 8
    p, n = h * w, 7
    out = torch.zeros(1, n + 1, h, w)
    classes = torch.ones(1, h, w, dtype=torch.long)
    _, parts = segmentation_loss(out, classes, torch.zeros(1, h, w), config)
    expected = 1 - (2 * p / n + 1) / (p / n + p + 1)
    assert abs(parts["dice"] - expected) < 1e-6
    assert parts["dice"] < 0.8
