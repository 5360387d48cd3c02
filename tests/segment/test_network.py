import numpy as np
import pytest
import torch

from histo.segment.network import HistoUNet, NetworkConfig, count_parameters, fuse_for_inference


def test_output_shape_and_size():
    torch.manual_seed(0)
    net = HistoUNet().eval()
    x = torch.rand(2, 3, 96, 160)
    with torch.inference_mode():
        y = net(x)
    assert y.shape == (2, 6, 96, 160)
    # a compact network: well under a million parameters (a few MB of weights)
    assert 100_000 < count_parameters(net) < 1_000_000


def test_fused_network_matches_unfused():
    torch.manual_seed(1)
    net = HistoUNet(NetworkConfig(widths=[4, 8, 8, 16, 16]))
    # non-trivial batch-norm statistics
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(2, 3, 64, 64))
    net.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        ref = net(x)
        fused = fuse_for_inference(net)(x)
    np.testing.assert_allclose(fused.numpy(), ref.numpy(), atol=1e-4)


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
    assert scores[5].min() >= 0 and scores[5].max() <= 1
