import numpy as np
import pytest
import torch

from histo.segment.network import (
    FusedCPUNetwork,
    HistoUNet,
    NetworkConfig,
    UpsampleConcatConv,
    count_parameters,
    fuse_for_inference,
    onednn_fusion_available,
    scores_from_logits,
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


def _trained_like(widths, n_outputs=6, seed=3):
    """A small network with non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    net = HistoUNet(NetworkConfig(widths=widths, n_outputs=n_outputs))
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(2, 3, 64, 64))
    return net.eval()


@pytest.mark.skipif(not onednn_fusion_available(), reason="torch without oneDNN post-ops")
@pytest.mark.parametrize("shape", [(64, 96), (16, 16), (48, 32)])
def test_fused_cpu_network_gives_the_autocast_logits_bit_for_bit(shape):
    """FusedCPUNetwork (input table, ReLU post-ops) = the folded network under bfloat16
    autocast on the tile scaled to [0, 1], every bit, border and 1-px coarsest level included."""
    net = fuse_for_inference(_trained_like([4, 8, 16, 16, 32], n_outputs=8))
    fast = FusedCPUNetwork(net.to(memory_format=torch.channels_last))
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div_(255.0)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = net(x)
        out = fast.logits(rgb)
    assert out.dtype == ref.dtype == torch.bfloat16 and out.shape == (1, 8, *shape)
    assert torch.equal(out, ref)


def test_scores_from_logits_are_softmax_then_sigmoid_as_planes():
    logits = torch.randn(1, 8, 20, 30).to(memory_format=torch.channels_last)
    scores = scores_from_logits(logits.to(torch.bfloat16), 7)
    assert scores.dtype == torch.float32 and scores.is_contiguous()
    planes = logits.to(torch.bfloat16).float().contiguous()
    assert torch.equal(scores[0, :7], torch.softmax(planes[0, :7], dim=0))
    torch.testing.assert_close(scores[0, 7], torch.sigmoid(planes[0, 7]))


def test_load_model_keeps_the_built_network_for_the_next_slide():
    from histo.segment import load_model

    first = load_model("default", precision="float32")
    assert load_model("default", precision="float32") is first
    assert load_model("default", precision="bfloat16") is not first
