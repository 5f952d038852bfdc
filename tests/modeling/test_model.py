"""The network: trunk shapes, and the dense pass equal to the patch-by-patch heads."""

import pytest
import torch

from deepmask_cli.core.config import ModelConfig
from deepmask_cli.modeling.model import DeepMask
from deepmask_cli.modeling.trunks import build_trunk


@pytest.mark.parametrize("name,channels", [("vgg-a", 512), ("resnet50", 1024), ("efficientnet-lite0", 112), ("efficientnet-lite1", 112), ("efficientnet-lite2", 120)])
@pytest.mark.parametrize("size", [(64, 64), (96, 160)])
def test_trunk_stride_16(name, channels, size):
    trunk = build_trunk(name).eval()
    with torch.no_grad():
        y = trunk(torch.randn(1, 3, *size))
    assert y.shape == (1, channels, size[0] // 16, size[1] // 16)
    assert trunk.out_channels == channels


def test_forward_shapes(tiny_config):
    model = DeepMask(tiny_config).eval()
    masks, scores = model(torch.rand(3, 3, 64, 64))
    assert masks.shape == (3, 16, 16) and scores.shape == (3,)


def test_config_rejects_bad_patch_size():
    with pytest.raises(ValueError, match="multiple of 32"):
        ModelConfig(patch_size=48)


@pytest.mark.parametrize("bottleneck", [0, 5])
@pytest.mark.parametrize("h,w", [(9, 10), (10, 11), (6, 6), (7, 6), (13, 9)])
def test_dense_equals_patch_by_patch(h, w, bottleneck):
    """Every window of a random map: dense heads == heads on the cropped
    window (with and without the score head's bottleneck)."""
    torch.manual_seed(h * 100 + w)
    cfg = ModelConfig(trunk="efficientnet-lite0", patch_size=96, object_size=60, mask_size=8, mask_channels=6,
                      mask_hidden=10, score_hidden=(7, 9), score_bottleneck=bottleneck, dropout=0.5)
    model = DeepMask(cfg).eval()
    f = cfg.feat_size
    fmap = torch.randn(2, 112, h, w)
    with torch.no_grad():
        dense_s = model.dense_scores(fmap)
        dense_m = model.dense_masks(fmap)
        assert dense_s.shape == (2, h - f + 1, w - f + 1)
        assert dense_m.shape == (2, h - f + 1, w - f + 1, 8, 8)
        for i in range(h - f + 1):
            for j in range(w - f + 1):
                m, s = model.heads(fmap[:, :, i : i + f, j : j + f])
                torch.testing.assert_close(dense_s[:, i, j], s, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(dense_m[:, i, j], m, rtol=1e-4, atol=1e-5)
        # the gathered windows of the inference path agree too
        b = torch.tensor([0, 1, 1]); ys = torch.tensor([0, h - f, min(1, h - f)]); xs = torch.tensor([w - f, 0, min(1, w - f)])
        torch.testing.assert_close(model.window_masks(fmap, b, ys, xs), dense_m[b, ys, xs], rtol=1e-4, atol=1e-5)
        kept = model.mask_head.window_weight().contiguous()  # as a Proposer keeps it
        torch.testing.assert_close(model.window_masks(fmap, b, ys, xs, kept), dense_m[b, ys, xs], rtol=1e-4, atol=1e-5)


def test_interleaving_on_hand_built_map():
    """A score head that reads one pooled cell: a hot feature cell is seen
    exactly by the windows whose pooling cell holds it."""
    cfg = ModelConfig(trunk="efficientnet-lite0", patch_size=64, object_size=40, mask_size=4, mask_channels=2,
                      mask_hidden=2, score_hidden=(1, 1), dropout=0.0)
    model = DeepMask(cfg).eval()
    sh = model.score_head
    with torch.no_grad():
        for lin in (sh.fc1, sh.fc2, sh.fc3):
            lin.weight.zero_(); lin.bias.zero_()
        # fc1 reads pooled cell (0, 0) of channel 0 (the window's top-left 2x2 cells)
        sh.fc1.weight.view(1, 112, 2, 2)[0, 0, 0, 0] = 1.0
        sh.fc2.weight.fill_(1.0)
        sh.fc3.weight.fill_(1.0)
    h, w = 9, 8
    for hy, hx in [(0, 0), (3, 4), (4, 5), (8, 7)]:
        fmap = torch.zeros(1, 112, h, w)
        fmap[0, 0, hy, hx] = 1.0
        with torch.no_grad():
            s = model.dense_scores(fmap)[0]
        expected = torch.zeros_like(s)
        for i in range(s.shape[0]):
            for j in range(s.shape[1]):
                expected[i, j] = float(i <= hy <= i + 1 and j <= hx <= j + 1)
        torch.testing.assert_close(s, expected)


@pytest.mark.parametrize("f", [2, 4, 12])
@pytest.mark.parametrize("h,w", [(0, 0), (1, 3), (8, 5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_score_fc1_by_parity_equals_the_dilated_convolution(f, h, w, channels_last):
    """The GPU's form of the dense score head's first layer (four plain
    convolutions, one per output parity, interleaved) gives the dilated
    convolution's sums, on maps of any size down to one window."""
    import torch.nn.functional as F

    from deepmask_cli.modeling.model import ScoreHead

    torch.manual_seed(f + h + w)
    head = ScoreHead(in_channels=8, feat_size=f, hidden=(16, 8), dropout=0.0).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    pooled = F.max_pool2d(torch.randn(2, 8, f + h, f + w), 2, stride=1).contiguous(memory_format=fmt)
    w1 = head.dense_weights(fmt)[0]
    with torch.no_grad():
        want = F.conv2d(pooled, w1, head.fc1.bias, dilation=2)
        got = head.fc1_by_parity(pooled, w1, head.fc1.bias)
    assert got.shape == want.shape == (2, 16, h + 1, w + 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trunk,from_mask", [("efficientnet-lite0", True), ("efficientnet-lite0", False),
                                               ("resnet50", True)])
def test_refinement_doubles_the_resolution_per_module_from_the_finer_maps(trunk, from_mask):
    """SharpMask's modules: the mask encoding plus the trunk's maps at strides
    16, 8, 4 give a 2**n finer mask, and the finer maps do reach it."""
    torch.manual_seed(0)
    cfg = ModelConfig(trunk=trunk, patch_size=64, object_size=40, mask_size=8, mask_channels=4, mask_hidden=16,
                      score_hidden=(8, 8), refine=(8, 4, 4), refine_from_mask=from_mask)
    model = DeepMask(cfg).eval()
    torch.nn.init.normal_(model.refine_head.predict.weight)  # as after training
    assert model.refine_head.strides == (16, 8, 4) and model.refine_head.out_size == 4 * 8
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        refined, scores = model.refined_masks(x)
        assert refined.shape == (2, 32, 32) and scores.shape == (2,)
        torch.testing.assert_close(scores, model(x)[1])  # the score is DeepMask's
        # a change the stride-4 map sees changes the refined mask
        levels = model.trunk.levels(model.normalize(x))
        base = model.refine_levels(levels)
        torch.testing.assert_close(base, refined)
        levels[4] = levels[4] + torch.randn_like(levels[4])
        assert not torch.allclose(model.refine_levels(levels), base)


def test_refinement_with_context_reads_the_windows_crop_of_the_larger_patchs_maps():
    """``refined_masks(patches, context)``: the trunk runs on the whole patch
    and the heads read the central window's crop of its maps (as of a whole
    photo's at inference), which differ from the window's own patch's."""
    torch.manual_seed(0)
    cfg = ModelConfig(trunk="efficientnet-lite0", patch_size=64, object_size=40, mask_size=8, mask_channels=4,
                      mask_hidden=16, score_hidden=(8, 8), refine=(8, 4, 4))
    model = DeepMask(cfg).eval()
    torch.nn.init.normal_(model.refine_head.predict.weight)
    x = torch.rand(2, 3, 64 + 2 * 32, 64 + 2 * 32)
    with torch.no_grad():
        refined, scores = model.refined_masks(x, 32)
        assert refined.shape == (2, 32, 32) and scores.shape == (2,)
        levels = model.trunk.levels(model.normalize(x))
        crops = {s: m[:, :, 32 // s: 96 // s, 32 // s: 96 // s] for s, m in levels.items()}
        torch.testing.assert_close(refined, model.refine_levels(crops))
        torch.testing.assert_close(scores, model.score_head(crops[16]))
        alone, _ = model.refined_masks(x[:, :, 32:96, 32:96])
        assert not torch.allclose(alone, refined)
        for bad, context in ((x, 0), (x, 16), (x[:, :, :120, :120], 28)):
            with pytest.raises(ValueError, match="context"):
                model.refined_masks(bad, context)


def test_untrained_correction_gives_deepmasks_mask_upsampled():
    """``refine_from_mask``: the refinement adds a correction to DeepMask's
    mask logits, upsampled, and starts at none, so training starts from
    DeepMask's masks; the paper's form starts from nothing of the kind."""
    torch.manual_seed(0)
    kw = dict(trunk="efficientnet-lite0", patch_size=64, object_size=40, mask_size=8, mask_channels=4, mask_hidden=16,
              score_hidden=(8, 8), refine=(8, 4))
    x = torch.rand(2, 3, 64, 64)
    model = DeepMask(ModelConfig(**kw)).eval()
    with torch.no_grad():
        refined, _ = model.refined_masks(x)
        coarse = torch.nn.functional.interpolate(model(x)[0][:, None], size=(16, 16), mode="bilinear",
                                                 align_corners=False)[:, 0]
        torch.testing.assert_close(refined, coarse)
        paper = DeepMask(ModelConfig(**kw, refine_from_mask=False)).eval()
        paper.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("refine_head.predict")},
                              strict=False)
        assert paper.refine_head.predict.weight.any()
        assert not torch.allclose(paper.refined_masks(x)[0], coarse)


def test_refinement_is_optional_and_checked():
    cfg = ModelConfig(trunk="efficientnet-lite0", patch_size=64, object_size=40, mask_size=8, mask_channels=4,
                      mask_hidden=16, score_hidden=(8, 8))
    model = DeepMask(cfg)
    assert model.refine_head is None and not any(k.startswith("refine") for k in model.state_dict())
    with pytest.raises(ValueError, match="no refinement"):
        model.refined_masks(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="1 to 4 positive"):
        ModelConfig(refine=(8, 0))
    assert ModelConfig.from_dict({**cfg.to_dict(), "refine": [8, 4]}).refine == (8, 4)
