"""inference.py against MONAI's sliding-window inference and an identity function."""
import pytest
import torch
from monai.inferers import sliding_window_inference as monai_swi

import inference


def test_identity_sliding_window_reproduces_odd_volume_exactly():
    x = torch.randn(2, 19, 23, 11)
    for blend, overlap, roi in (("gaussian", 0.5, (8, 8, 8)), ("constant", 0.25, (7, 10, 5)),
                                ("gaussian", 0.75, (32, 9, 16))):
        y = inference.sliding_window_inference(lambda t: t, x, roi, overlap=overlap, sw_batch_size=3, blend=blend)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.equal(y, x)
    y = inference.sliding_window_inference(lambda t: t, x[None], (8, 8, 8), stitch_device="cpu")
    assert y.shape == (1, 2, 19, 23, 11) and torch.equal(y[0], x)


def test_sliding_window_matches_monai_and_checks_fn():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(2, 3, 3, padding=1)
    x = torch.randn(2, 19, 23, 11)
    with torch.no_grad():
        for roi, overlap in (((8, 10, 6), 0.5), ((8, 10, 6), 0.25), ((24, 10, 16), 0.5)):
            ours = inference.sliding_window_inference(net, x, roi, overlap=overlap, sw_batch_size=4)
            ref = monai_swi(x[None], roi, 4, net, overlap=overlap, mode="gaussian")[0]
            assert torch.allclose(ours, ref, atol=1e-5)
    with pytest.raises(ValueError, match="fn must map"):
        inference.sliding_window_inference(lambda t: t[:, :, :4], x, (8, 8, 8))
    with pytest.raises(ValueError, match="expected 5"):
        inference.sliding_window_inference(lambda t: t, x, (8, 8, 8), out_channels=5)
