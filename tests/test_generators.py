import pytest
import torch

from prismfl.model import masked
from prismfl.model.generators import ArchSpec, build_generator, calibrate_batchnorm


@pytest.mark.parametrize("channels,expected", [(1, 3_543_616), (3, 3_544_768)])
def test_paper_resnet_weight_count(channels, expected):
    net = build_generator(ArchSpec("resnet", 128, 64, channels, 32, 0))
    assert masked.num_maskable(net) == expected
    assert not any(p.requires_grad for n, p in net.named_parameters() if not n.endswith("scores"))
    assert all(bn.weight is None for bn in net.modules() if isinstance(bn, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("arch,size", [("resnet", 32), ("dcgan", 28), ("dcgan", 32), ("mlp", 28), ("mlp-up", 28)])
def test_output_shape_and_range(arch, size):
    net = build_generator(ArchSpec(arch, 16, 8, 1, size, 0))
    masked.configure(net, rng=torch.Generator().manual_seed(0))
    x = net(torch.randn(5, 16))
    assert x.shape == (5, 1, size, size)
    assert x.abs().max() <= 1


def test_mlp_up_counts_a_quarter_of_the_output_weights_and_has_no_pixel_speckle():
    from prismfl.model.generators import count_weights

    spec = ArchSpec("mlp-up", 64, 512, 1, 28, 0)
    net = build_generator(spec)
    assert count_weights(spec) == masked.num_maskable(net) == 64 * 512 + 512 * 1024 + 1024 * 14 * 14

    def roughness(name):  # mean absolute difference between horizontally adjacent pixels
        net = build_generator(ArchSpec(name, 64, 512, 1, 28, 0))
        masked.set_fixed_mask(
            net, torch.rand(masked.num_maskable(net), generator=torch.Generator().manual_seed(1)) < 0.5
        )
        calibrate_batchnorm(net, seed=0, n=256, batch=128)
        x = net(torch.randn(16, 64, generator=torch.Generator().manual_seed(0)))
        return float((x[..., 1:] - x[..., :-1]).abs().mean())

    assert roughness("mlp-up") < 0.5 * roughness("mlp")  # an untrained MLP's output is per-pixel noise
    with pytest.raises(ValueError, match="even image size"):
        ArchSpec("mlp-up", 8, 8, 1, 27, 0).validate()


def test_resnet_rejects_other_sizes():
    with pytest.raises(ValueError, match="32x32"):
        build_generator(ArchSpec("resnet", 16, 8, 1, 28, 0))


def test_batchnorm_calibration_is_deterministic():
    spec = ArchSpec("dcgan", 8, 8, 1, 28, 0)
    outs = []
    for _ in range(2):
        net = build_generator(spec)
        n = masked.num_maskable(net)
        masked.set_fixed_mask(net, torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.5)
        calibrate_batchnorm(net, seed=0, n=300, batch=100)
        outs.append(net(torch.randn(4, 8, generator=torch.Generator().manual_seed(2))))
    assert torch.equal(outs[0], outs[1])
