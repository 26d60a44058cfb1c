"""Excitation probe: hand-computed per-class mean/std, NoSqueeze's spatial average, the 50-per-class
limit, gate ranges on a real patched backbone, and the excitations.npz file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ablations.data import InMemoryData
from ablations.patch import build_model
from ablations.probe import load_excitations, probe_excitations, save_excitations
from ablations.schema import BackboneSpec, SESpec
from ablations.se import SEModule


def identity_se(channels: int, squeeze: str = "avg", name: str = "SE_2_1") -> SEModule:
    """s = relu(relu(z)): with identity FCs and a ReLU gate the excitation is the squeezed input."""
    se = SEModule(channels, reduction=1, squeeze=squeeze, gate="relu", name=name)
    with torch.no_grad():
        se.fc1.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
        se.fc2.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
    return se


def constant_images(values: list[list[int]], size: int = 3) -> torch.Tensor:
    """One image per row of `values`, channel c filled with values[i][c]."""
    v = torch.tensor(values, dtype=torch.uint8)
    return v[:, :, None, None].expand(-1, -1, size, size).contiguous()


def data_from(x: torch.Tensor, y: list[int], classes: int, mean=None, std=None) -> InMemoryData:
    c = x.shape[1]
    return InMemoryData(x, torch.tensor(y), x, torch.tensor(y), classes, batch_size=1, eval_batch_size=2,
                        mean=mean or [0.0] * c, std=std or [1.0] * c)


def test_hand_computed_mean_and_std():
    # class 0: channel 0 sees 1 and 3, channel 1 sees 2 and 2; class 2: one image (5, 7); no class 1.
    x = constant_images([[1, 2], [5, 7], [3, 2]])
    model = nn.Sequential(identity_se(2))
    stats = probe_excitations(model, data_from(x, [0, 2, 0], classes=3), num_classes=3)
    assert stats["blocks"].tolist() == ["SE_2_1"]
    assert stats["classes"].tolist() == [0, 2] and stats["counts"].tolist() == [2, 1]
    np.testing.assert_allclose(stats["SE_2_1.mean"], [[2.0, 2.0], [5.0, 7.0]])
    np.testing.assert_allclose(stats["SE_2_1.std"], [[1.0, 0.0], [0.0, 0.0]], atol=1e-6)
    assert stats["SE_2_1.mean"].dtype == np.float32


def test_limit_takes_the_first_images_of_each_class():
    x = constant_images([[1], [3], [100], [7]])
    stats = probe_excitations(nn.Sequential(identity_se(1)), data_from(x, [0, 0, 0, 1], classes=2),
                              num_classes=2, limit=2)
    assert stats["counts"].tolist() == [2, 1]
    np.testing.assert_allclose(stats["SE_2_1.mean"][:, 0], [2.0, 7.0])  # 100 (3rd of class 0) unused


def test_nosqueeze_is_averaged_over_space():
    # NoSqueeze's s is per pixel: relu(x - 2) with the normalisation shift; half the pixels 0, half 4
    # -> s is 0 or 2 -> 1.0 per image. A second image, all 6 -> s = 4. Class mean 2.5, std 1.5.
    a = torch.zeros(1, 1, 2, 2, dtype=torch.uint8)
    a[..., 0] = 4
    b = torch.full((1, 1, 2, 2), 6, dtype=torch.uint8)
    x = torch.cat([a, b])
    stats = probe_excitations(nn.Sequential(identity_se(1, squeeze="none")),
                              data_from(x, [0, 0], classes=1, mean=[2.0], std=[1.0]), num_classes=1)
    np.testing.assert_allclose(stats["SE_2_1.mean"], [[2.5]])
    np.testing.assert_allclose(stats["SE_2_1.std"], [[1.5]])


@pytest.mark.parametrize(("gate", "low", "high"), [("sigmoid", 0.0, 1.0), ("tanh", -1.0, 1.0)])
def test_real_backbone_shapes_names_and_gate_range(gate, low, high):
    backbone = BackboneSpec(layers=(1, 2, 1, 1), channels=(16, 16, 16, 16), small_stem=True,
                            num_classes=4)
    model = build_model(backbone, SESpec(gate=gate))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=g)
    data = data_from(x, [0, 1, 2, 3] * 3, classes=4, mean=[127.5] * 3, std=[64.0] * 3)
    stats = probe_excitations(model, data, num_classes=4)
    assert stats["blocks"].tolist() == ["SE_2_1", "SE_3_1", "SE_3_2", "SE_4_1", "SE_5_1"]
    assert stats["counts"].tolist() == [3, 3, 3, 3]
    for name in stats["blocks"]:
        mean, std = stats[f"{name}.mean"], stats[f"{name}.std"]
        assert mean.shape == std.shape == (4, 64)  # classes x channels (bottleneck outputs 4 x 16)
        assert np.all(mean > low) and np.all(mean < high)
        assert np.all(std >= 0) and np.all(std <= (high - low) / 2)
    assert model.training  # the probe restores the mode it found


def test_model_without_se_and_npz_round_trip(tmp_path):
    backbone = BackboneSpec(layers=(1, 1, 1, 1), channels=(16, 16, 16, 16), small_stem=True,
                            num_classes=2)
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    stats = probe_excitations(build_model(backbone, None), data_from(x, [0, 1, 1, 1], classes=2),
                              num_classes=2)
    assert stats["blocks"].size == 0 and stats["counts"].tolist() == [1, 3]
    save_excitations(tmp_path / "excitations.npz", stats)
    back = load_excitations(tmp_path / "excitations.npz")
    assert set(back) == {"blocks", "classes", "counts"}
    assert back["counts"].tolist() == [1, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["excitations.npz"]  # no temp file left behind
