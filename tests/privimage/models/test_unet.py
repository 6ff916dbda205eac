"""The UNet presets: pinned sizes, shapes, conditioning, and only layers the DP engine has exact rules for."""

import pytest
import torch
import torch.nn as nn

from privimage.models import PRESETS, build_unet, count_parameters


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Pinned counts. "s" ≈ 1.75M and "b" ≈ 6.1M are the sizes PrivImage reports for its CIFAR-10 models.
EXPECTED = {"s": 1_754_499, "m": 3_954_563, "b": 6_077_123, "celeba32": 1_804_451, "celeba64": 1_949_603,
            "tiny": 180_947}


def test_every_preset_is_pinned():
    assert set(EXPECTED) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_count(name):
    assert count_parameters(build_unet(name)) == EXPECTED[name]


def test_official_sizes_match_the_paper():
    assert abs(EXPECTED["s"] - 1.75e6) / 1.75e6 < 0.01
    assert abs(EXPECTED["b"] - 6.1e6) / 6.1e6 < 0.01


def test_shapes_grayscale_and_unconditional():
    net = build_unet("tiny", resolution=16, in_channels=1, num_classes=0)
    assert net.label_embed is None
    out = net(torch.randn(3, 1, 16, 16), torch.randn(3), None)
    assert out.shape == (3, 1, 16, 16)


def test_labels_change_the_output_and_null_label_is_default():
    net = build_unet("tiny", resolution=8, ch_mult=(1,), num_classes=3)
    for p in net.parameters():  # zero-initialised output layers would hide the conditioning
        nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 3, 8, 8), torch.zeros(2)
    a = net(x, t, torch.tensor([0, 0]))
    b = net(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    assert torch.equal(net(x, t, None), net(x, t, torch.tensor([3, 3])))


def test_only_layers_with_engine_rules():
    allowed = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.Embedding)
    for name in PRESETS:
        for mod_name, module in build_unet(name).named_modules():
            if any(True for _ in module.parameters(recurse=False)):
                assert isinstance(module, allowed), f"{name}: {mod_name} is {type(module).__name__}"


def test_engine_per_sample_norms_match_the_loop_reference():
    from privimage.diffusion import EDMDenoiser, EDMLoss
    from privimage.engine import check_per_sample_norms

    torch.manual_seed(0)
    den = EDMDenoiser(build_unet("tiny", nf=8, resolution=8, ch_mult=(1, 2), attn_resolutions=(4,),
                                 num_classes=3)).double()
    for p in den.parameters():
        nn.init.normal_(p, std=0.2)
    loss = EDMLoss(num_noise=2, label_dropout=0.0)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 1, 2])
    drawn = loss.draw(x, y, num_classes=3, generator=torch.Generator().manual_seed(0))
    drawn = (drawn[0], drawn[1].double(), drawn[2].double())

    def loss_fn(m, batch):
        return loss.compute(m, batch, *drawn).double()

    check = check_per_sample_norms(den, loss_fn, x, groups=loss.groups(3))
    assert check.engine_norms.shape == (3,)
    assert check.ok, check
