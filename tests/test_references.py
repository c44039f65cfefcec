"""The reference samplers of every quality table (eval/references.py)."""

import numpy as np
import pytest
import torch

from prismfl.eval.references import pca_gaussian, reference_images


def _two_classes(n0=300, n1=700):
    images = torch.cat([torch.full((n0, 1, 4, 4), -0.5), torch.full((n1, 1, 4, 4), 0.5)])
    return images, np.array([0] * n0 + [1] * n1)


def test_pca_gaussian_with_no_within_class_spread_returns_the_class_images_in_their_shares():
    images, labels = _two_classes()
    out, classes = pca_gaussian(images, labels, 4000, np.random.default_rng(0), components=3)
    assert out.shape == (4000, 1, 4, 4) and out.dtype == torch.float32
    flat = out.reshape(4000, -1)
    is0 = torch.allclose(flat[flat[:, 0] < 0], torch.tensor(-0.5), atol=1e-6)
    is1 = torch.allclose(flat[flat[:, 0] > 0], torch.tensor(0.5), atol=1e-6)
    assert is0 and is1
    assert torch.equal(classes, (flat[:, 0] > 0).long())  # each image's label is the class it was drawn from
    share1 = float((flat[:, 0] > 0).float().mean())
    assert abs(share1 - 0.7) < 0.03  # multinomial with the class shares: sd 0.007


def test_pca_gaussian_samples_lie_in_the_top_components_span_with_the_class_means():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2000, 16, generator=gen) * torch.linspace(0.1, 0.001, 16)  # variance falls along axes
    labels = np.repeat([0, 1], 1000)
    base[1000:, 0] += 0.3
    out, _ = pca_gaussian(base.reshape(2000, 1, 4, 4), labels, 20000, np.random.default_rng(1), components=4)
    out = out.reshape(20000, 16).double().numpy()
    x = base.double().numpy()
    mu = x.mean(0)
    top = np.linalg.eigh(np.cov(x - mu, rowvar=False))[1][:, -4:]  # recomputed here, independently
    residual = (out - mu) - (out - mu) @ top @ top.T
    assert np.abs(residual).max() < 1e-5  # nothing outside the top components' span
    high = out[:, 0] > 0.15  # the two classes, told apart by their means on the first axis
    assert abs(high.mean() - 0.5) < 0.02
    assert abs(out[high, 0].mean() - x[1000:, 0].mean()) < 0.01
    assert abs(out[~high, 0].mean() - x[:1000, 0].mean()) < 0.01
    assert abs(out[~high, 1].std() - x[:1000, 1].std()) < 0.01  # the class's spread along a top component


def test_pca_gaussian_clips_to_the_image_range():
    images, labels = _two_classes()
    out, _ = pca_gaussian(images * 3, labels, 100, np.random.default_rng(0), components=2)
    assert float(out.min()) == -1.0 and float(out.max()) == 1.0


def test_pca_gaussian_is_seeded():
    images, labels = _two_classes(50, 50)
    images = images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    a = pca_gaussian(images, labels, 100, np.random.default_rng(5), components=2)
    b = pca_gaussian(images, labels, 100, np.random.default_rng(5), components=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_unknown_reference_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown reference 'gan'"):
        reference_images("gan", "fashion-mnist", 10)


def _three_blobs(n=3000, d=16):
    gen = torch.Generator().manual_seed(4)
    labels = np.arange(n) % 3
    centres = torch.tensor([[-0.4] * d, [0.0] * d, [0.4] * d])
    images = centres[labels] + 0.05 * torch.randn(n, d, generator=gen)
    return images.reshape(n, 1, 4, 4), labels


def test_dp_pca_gaussian_at_a_huge_epsilon_is_the_plain_fit_on_the_private_part():
    from prismfl.eval.references import dp_pca_gaussian

    images, labels = _three_blobs()
    out, classes = dp_pca_gaussian(images, labels, 6000, np.random.default_rng(0), 1e7, 1e-5, components=4,
                                   public=500, clip_multiplier=10.0)  # fmt: skip
    flat = out.reshape(6000, -1)
    for c, centre in enumerate((-0.4, 0.0, 0.4)):
        assert abs(float((classes == c).float().mean()) - 1 / 3) < 0.03
        assert abs(float(flat[classes == c].mean()) - centre) < 0.01  # each class where its images are
        assert float(flat[classes == c].std(0).mean()) < 0.08  # and about as spread


def test_dp_pca_gaussian_noise_is_calibrated_and_fresh():
    from prismfl.eval.references import dp_pca_gaussian

    images, labels = _three_blobs()
    a = dp_pca_gaussian(images, labels, 300, np.random.default_rng(0), 2.0, 1e-5, components=4, public=500)[0]
    b = dp_pca_gaussian(images, labels, 300, np.random.default_rng(0), 2.0, 1e-5, components=4, public=500)[0]
    assert not torch.equal(a, b)  # the release's noise comes from the OS, not from the sampling seed


def test_dp_pca_gaussian_says_when_the_noise_swamps_every_class():
    from prismfl.eval.references import dp_pca_gaussian

    images, labels = _three_blobs(60)
    with pytest.raises(ValueError, match="no class's noisy count is above the noise"):
        dp_pca_gaussian(images, labels, 10, np.random.default_rng(0), 0.01, 1e-5, components=2, public=30)


def test_only_pca_gaussian_has_a_private_version():
    with pytest.raises(ValueError, match="only the pca-gaussian reference has a private version"):
        reference_images("real", "fashion-mnist", 10, epsilon=1.0)
