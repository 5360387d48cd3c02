import numpy as np
import pytest
import torch

from histo.segment.network import (
    HistoUNet,
    NetworkConfig,
    UpsampleConcatConv,
    count_parameters,
    fuse_for_inference,
)


def test_output_shape_and_size():
    torch.manual_seed(0)
    net = HistoUNet().eval()
    x = torch.rand(2, 3, 96, 160)
    with torch.inference_mode():
        y = net(x)
    assert y.shape == (2, 6, 96, 160)
    # a compact network: well under a million parameters (a few MB of weights)
    assert 100_000 < count_parameters(net) < 1_000_000


@pytest.mark.parametrize("shape", [(64, 64), (16, 16), (48, 80), (96, 32)])
def test_fused_network_matches_unfused(shape):
    """Batch norm folded and the decoder rewritten (UpsampleConcatConv): the same outputs,
    the image's border rows and columns included (16 px: the coarsest level is 1 px high)."""
    torch.manual_seed(1)
    net = HistoUNet(NetworkConfig(widths=[4, 8, 8, 16, 16]))
    # non-trivial batch-norm statistics
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(2, 3, 64, 64))
    net.eval()
    x = torch.rand(1, 3, *shape)
    with torch.inference_mode():
        ref = net(x)
        fused = fuse_for_inference(net)
        assert all(isinstance(b, UpsampleConcatConv) for b in fused.up)
        out = fused(x)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-4)


def test_upsample_concat_conv_is_the_original_block():
    """The phase convolutions equal bilinear upsampling, concatenation and convolution at
    every pixel (float32), and stay within bfloat16 rounding of it under autocast."""
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(6 + 5, 7, 3, padding=1)
    block = UpsampleConcatConv(conv, c_up=6)
    y, skip = torch.randn(1, 6, 9, 13), torch.randn(1, 5, 18, 26)
    with torch.inference_mode():
        up = torch.nn.functional.interpolate(y, scale_factor=2, mode="bilinear")
        ref = torch.relu(conv(torch.cat([up, skip], 1)))
        out = block(y, skip)
        np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-5)
        # the interior comes from the phase convolutions, the two-pixel ring from the original
        block.phase_weight.zero_()
        changed = (block(y, skip) - ref).abs() > 1e-5
        assert changed[..., 2:-2, 2:-2].any()
        assert not changed[..., :2, :].any() and not changed[..., :, -2:].any()
        block.phase_weight.copy_(UpsampleConcatConv(conv, c_up=6).phase_weight)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = block(y, skip).float()
        assert (low - ref).abs().max() < 0.05 * ref.abs().max()


def test_config_roundtrip():
    cfg = NetworkConfig(widths=[4, 8, 16, 32, 64])
    assert NetworkConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("shape", [(50, 70), (16, 16), (130, 33)])
def test_segmenter_pads_odd_tiles(shape):
    from histo.segment import NetworkSegmenter

    torch.manual_seed(0)
    seg = NetworkSegmenter(HistoUNet(NetworkConfig(widths=[4, 8, 8, 16, 16])))
    scores = seg.predict_scores(np.full((*shape, 3), 200, np.uint8))
    assert scores.shape == (6, *shape)
    np.testing.assert_allclose(scores[:5].sum(0), 1.0, atol=1e-5)
