"""The GAN presets: pinned sizes, per-sample independence, conditioning, engine-ready discriminator, bad input."""

import doctest
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import privimage.models.gan as gan_module
from privimage.engine.layers import rule_for
from privimage.models import GAN_PRESETS, GANConfig, Generator, build_gan
from privimage.models.gan import parameter_counts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Pinned counts. DPImageBench reports its CIFAR-10 DP-GAN generator at 3.8M parameters (README, §6).
EXPECTED = {"32": {"generator": 3_838_884, "discriminator": 1_649_127},
            "64": {"generator": 3_086_916, "discriminator": 4_896_935},
            "demo": {"generator": 62_628, "discriminator": 49_063},
            "tiny": {"generator": 2_604, "discriminator": 3_259}}


@pytest.fixture(scope="module")
def presets():
    return {name: build_gan(config) for name, config in GAN_PRESETS.items()}


def test_every_preset_is_pinned_and_the_reference_size_matches(presets):
    assert set(EXPECTED) == set(GAN_PRESETS)
    for name, (g, d) in presets.items():
        counts = {"generator": sum(p.numel() for p in g.parameters()),
                  "discriminator": sum(p.numel() for p in d.parameters())}
        assert counts == EXPECTED[name], name
    assert parameter_counts(GAN_PRESETS["tiny"]) == EXPECTED["tiny"]
    assert abs(EXPECTED["32"]["generator"] - 3.8e6) / 3.8e6 < 0.02


def test_discriminator_has_only_layers_with_engine_rules_and_no_batchnorm_anywhere(presets):
    for name, (g, d) in presets.items():
        for mod_name, module in d.named_modules():
            if any(True for _ in module.parameters(recurse=False)):
                assert rule_for(module) is not None, f"{name}: discriminator.{mod_name} ({type(module).__name__})"
        for net in (g, d):
            assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()), name


@pytest.mark.parametrize("train", [True, False])
def test_each_image_depends_on_its_own_latent_only(train):
    """No batch statistics: a generated image (and a discriminator logit) is the same alone or in a batch."""
    g, d = build_gan("tiny")
    g, d = g.double().train(train), d.double()
    z, y = torch.randn(5, 8, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    # train mode: spectral norm's power iteration updates buffers at each call, so every call starts from one state
    state = {k: v.clone() for k, v in g.state_dict().items()}
    g_batch = g(z, y)
    for i in (0, 3):
        g.load_state_dict(state)
        torch.testing.assert_close(g(z[i:i + 1], y[i:i + 1])[0], g_batch[i], rtol=1e-9, atol=1e-9)
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64) * 2 - 1
    logits = d(x, y[:4])
    torch.testing.assert_close(d(x[2:3], y[2:3])[0], logits[2], rtol=1e-9, atol=1e-9)


def test_labels_condition_both_networks():
    g, d = build_gan("tiny")
    for p in g.parameters():
        nn.init.normal_(p, std=0.3)
    z = torch.randn(2, 8)
    assert not torch.allclose(g(z, torch.tensor([0, 0])), g(z, torch.tensor([1, 1])))
    x = torch.randn(2, 3, 8, 8)
    assert not torch.allclose(d(x, torch.tensor([0, 0])), d(x, torch.tensor([2, 2])))


def test_unconditional_grayscale_and_64():
    g, d = build_gan("tiny", num_classes=0, in_channels=1)
    x = g(torch.randn(3, 8), None)
    assert x.shape == (3, 1, 8, 8) and d(x, None).shape == (3,)
    assert g.shared is None and d.embed is None
    g64, d64 = build_gan("64", num_classes=2)
    x = g64(torch.randn(1, 80), torch.tensor([1]))
    assert x.shape == (1, 3, 64, 64) and d64(x, torch.tensor([1])).shape == (1,)
    assert float(x.detach().abs().max()) <= 1.0


def test_bad_inputs_are_named():
    g, d = build_gan("tiny")
    with pytest.raises(ValueError, match=r"latents of shape \(B, 8\)"):
        g(torch.randn(2, 7), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels of shape \(2,\)"):
        g(torch.randn(2, 8), None)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        g(torch.randn(2, 8), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"images of shape \(B, 3, 8, 8\)"):
        d(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    g0, _ = build_gan("tiny", num_classes=0)
    with pytest.raises(ValueError, match="unconditional"):
        g0(torch.randn(2, 8), torch.tensor([0, 1]))


@pytest.mark.parametrize("overrides, match", [
    (dict(resolution=16), "log2"),
    (dict(z_dim=9), "equal chunks"),
    (dict(g_attention=(4,)), "attention"),
    (dict(d_downsample=(True,)), "one entry"),
    (dict(d_downsample=(True, True, True, True), d_ch_mult=(1, 1, 1, 1)), "halved"),
    (dict(in_channels=2), "in_channels"),
])
def test_inconsistent_configs_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        replace(GAN_PRESETS["tiny"], **overrides)


def test_config_and_generator_round_trip_through_dicts():
    config = GAN_PRESETS["64"]
    assert GANConfig.from_dict(config.to_dict()) == config
    g, _ = build_gan("tiny")
    loaded = Generator.from_state(g.config.to_dict(), g.state_dict())
    z, y = torch.randn(2, 8), torch.tensor([0, 2])
    assert not loaded.training and torch.equal(loaded(z, y), g.eval()(z, y))
    with pytest.raises(ValueError, match="Unknown GAN preset"):
        build_gan("huge")


def test_docstring_example():
    result = doctest.testmod(gan_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
