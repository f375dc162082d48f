"""Pixel relevance (lrp_ray.pixels): the backbone backward against zennit applied directly, conservation,
the vectorised K-target backward, sum-preserving maps, wrapped models and bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lrp_ray.models.backbone import FrozenBatchNorm2d, Joiner, MaskedBackbone, ResNet
from lrp_ray.models.position_encoding import PositionEmbeddingSine
from lrp_ray.pixels import (
    BackbonePropagator,
    CompositeSpec,
    block_sum,
    reduced_shape,
    resolve_composite,
    to_image_grid,
)
from lrp_ray.pixels.canonizers import backbone_canonizers
from lrp_ray.pixels.composites import pixel_box
from lrp_ray.pixels.maps import overlap_matrix

NAMED = ["EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1Flat"]


def _randomise_norms(module: nn.Module, seed: int = 0, zero_bias: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.num_features
            m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(torch.zeros(n) if zero_bias else 0.2 * torch.randn(n, generator=g))
            m.running_mean.copy_(torch.zeros(n) if zero_bias else 0.2 * torch.randn(n, generator=g))


class _Detr(nn.Module):
    """The two parts of a DETR the pixel backward reads: ``backbone`` (Joiner) and ``input_proj``."""

    def __init__(self, resnet: ResNet, d: int = 16, zero_bias: bool = False) -> None:
        super().__init__()
        self.backbone = Joiner(MaskedBackbone(resnet), PositionEmbeddingSine(d // 2, normalize=True))
        self.input_proj = nn.Conv2d(resnet.out_channels, d, 1)
        if zero_bias:
            nn.init.zeros_(self.input_proj.bias)


def _resnet18(width: int = 64, seed: int = 0, zero_bias: bool = False) -> ResNet:
    torch.manual_seed(seed)
    net = ResNet(depth=18, stem_out_channels=width, res2_out_channels=width)
    _randomise_norms(net, seed, zero_bias)
    return net


def _to_torchvision(ours: ResNet) -> nn.Module:
    """The same ResNet-18 in torchvision's layout (torch BatchNorm2d, eps folded into the variance)."""
    import torchvision

    tv = torchvision.models.resnet18().double()

    def put(conv: nn.Conv2d, bn: nn.BatchNorm2d, src: nn.Conv2d) -> None:
        conv.weight.data.copy_(src.weight.data)
        norm = src.norm
        bn.eps = 0.0
        bn.weight.data.copy_(norm.weight)
        bn.bias.data.copy_(norm.bias)
        bn.running_mean.copy_(norm.running_mean)
        bn.running_var.copy_(norm.running_var + norm.eps)

    put(tv.conv1, tv.bn1, ours.stem.conv1)
    for s in range(2, 6):
        for i, blk in enumerate(getattr(ours, f"res{s}")):
            t = getattr(tv, f"layer{s - 1}")[i]
            put(t.conv1, t.bn1, blk.conv1)
            put(t.conv2, t.bn2, blk.conv2)
            assert (blk.shortcut is None) == (t.downsample is None)
            if blk.shortcut is not None:
                put(t.downsample[0], t.downsample[1], blk.shortcut)
    return nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool, tv.layer1, tv.layer2, tv.layer3, tv.layer4)


def _zennit_direct(net: nn.Module, composite, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """zennit as documented: one forward and one backward per target under the composite."""
    out = []
    for k in range(upstream.shape[0]):
        xi = x.clone().requires_grad_(True)
        with composite.context(net) as m:
            y = m(xi)
            (g,) = torch.autograd.grad(y, xi, upstream[k:k + 1])
        out.append(g[0])
    return torch.stack(out)


@pytest.fixture(scope="module")
def detr18() -> _Detr:
    """ResNet-18 (torchvision's widths), float64."""
    return _Detr(_resnet18()).double().eval()


@pytest.fixture(scope="module")
def detr16() -> _Detr:
    """ResNet-18 layout at 16 channels (fast), float64."""
    return _Detr(_resnet18(width=16)).double().eval()


def _upstream(prop: BackbonePropagator, x: torch.Tensor, k: int, seed: int = 1) -> torch.Tensor:
    """Token relevance like the engine's: g * tokens (tokens = input_proj output)."""
    with torch.no_grad():
        y = prop.net(x)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, *y.shape[1:], generator=g, dtype=y.dtype) * y


@pytest.mark.parametrize("name", NAMED)
def test_backbone_equals_zennits_own_torchvision_canonizer(detr18, name):
    """Ours (detectron2 layout, our canonizers, K targets in one backward) == zennit's ResNetCanonizer on
    the same weights in torchvision layout, one backward per target, float64, same upstream relevance."""
    from zennit.torchvision import ResNetCanonizer

    prop = BackbonePropagator(detr18, composite=name, dtype=torch.float64)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    up = _upstream(prop, x, 2)
    ours = prop.relevance(x[0], up)
    tv = nn.Sequential(_to_torchvision(detr18.backbone[0].backbone), copy.deepcopy(detr18.input_proj))
    tv = tv.double().eval()
    with torch.no_grad():
        assert torch.allclose(tv(x), prop.net(x), rtol=1e-10, atol=1e-10)
    low, high = pixel_box(None, torch.float64)
    ref = _zennit_direct(tv, resolve_composite(name).build([ResNetCanonizer()], low, high), x, up)
    scale = ref.abs().max()
    assert scale > 0
    assert float((ours - ref).abs().max() / scale) < 1e-6


@pytest.mark.parametrize("name", NAMED)
def test_backbone_equals_zennit_direct_on_our_backbone(detr16, name):
    prop = BackbonePropagator(detr16, composite=name, dtype=torch.float64)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    up = _upstream(prop, x, 4)
    net = nn.Sequential(copy.deepcopy(detr16.backbone[0].backbone), copy.deepcopy(detr16.input_proj))
    low, high = pixel_box(None, torch.float64)
    ref = _zennit_direct(net, resolve_composite(name).build(backbone_canonizers(), low, high), x, up)
    ours = prop.relevance(x[0], up)
    assert float((ours - ref).abs().max() / ref.abs().max()) < 1e-6


def test_canonizers_keep_the_forward_and_undo_themselves(detr16):
    prop = BackbonePropagator(detr16, dtype=torch.float64)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        before = prop.net(x)
        with prop.composite().context(prop.net) as net:
            during = net(x)
            merged = net.body.stem.conv1
            assert merged.bias is not None and "forward" in vars(merged)
        after = prop.net(x)
    assert torch.allclose(during, before, rtol=1e-10, atol=1e-10)
    assert torch.equal(after, before)
    conv = prop.net.body.stem.conv1
    assert conv.bias is None and "forward" not in vars(conv)
    assert not any(n.startswith("canonizer_") for n, _ in prop.net.named_children())


@pytest.mark.parametrize("name", ["EpsilonFlat", "EpsilonPlusFlat"])
def test_conservation_with_zero_biases(name):
    """Zero biases, tiny stabilisers: every unit of relevance reaches the pixels (flat first layer, epsilon
    or z+ elsewhere, Norm at residual sums). z+ needs positive relevance (where a unit's z+ > 0)."""
    detr = _Detr(_resnet18(width=16, zero_bias=True), zero_bias=True).double().eval()
    spec = CompositeSpec(name, epsilon=1e-12, stabilizer=1e-12)
    prop = BackbonePropagator(detr, composite=spec, dtype=torch.float64)
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    up = _upstream(prop, x, 3)
    if name == "EpsilonPlusFlat":
        up = up.abs()
    out = prop.relevance(x[0], up)
    np.testing.assert_allclose(out.sum((1, 2, 3)).numpy(), up.sum((1, 2, 3)).numpy(), rtol=1e-6)
    # without the residual canonizer the sums double-count: the check above can fail
    with_bias = BackbonePropagator(_Detr(_resnet18(width=16)).double().eval(), composite=spec,
                                   dtype=torch.float64)
    up_b = _upstream(with_bias, x, 1).abs()
    lost = with_bias.relevance(x[0], up_b).sum() - up_b.sum()
    assert abs(float(lost)) > 1e-6 * float(up_b.sum())


def test_vectorised_targets_equal_single_targets(detr16):
    prop = BackbonePropagator(detr16, dtype=torch.float64)
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    up = _upstream(prop, x, 5)
    together = prop.relevance(x[0], up)
    chunked = prop.relevance(x[0], up, chunk=2)
    single = torch.cat([prop.relevance(x[0], up[k:k + 1]) for k in range(5)])
    assert float((together - single).abs().max() / single.abs().max()) < 1e-10
    assert float((chunked - single).abs().max() / single.abs().max()) < 1e-10
    assert not torch.allclose(single[0], single[1])  # distinct targets give distinct maps
    zero = up.clone()
    zero[:2] = 0.0
    for rule in (*NAMED, "EpsilonFlat"):   # a chunk of all-zero targets gives zero maps, one per target
        z = BackbonePropagator(detr16, composite=rule, dtype=torch.float64).relevance(x[0], zero, chunk=2)
        assert z.shape == together.shape
        assert float(z[:2].abs().max()) == 0.0 and float(z[2].abs().max()) > 0


def test_linear_in_the_upstream_relevance(detr16):
    prop = BackbonePropagator(detr16, dtype=torch.float64)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    up = _upstream(prop, x, 2)
    r = prop.relevance(x[0], torch.cat([up, up[:1] + 2 * up[1:]]))
    assert torch.allclose(r[2], r[0] + 2 * r[1], rtol=1e-9, atol=1e-12)


def test_reference_tokens_detect_a_different_backbone(detr16):
    prop = BackbonePropagator(detr16, dtype=torch.float64)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    up = _upstream(prop, x, 1)
    with torch.no_grad():
        y = prop.net(x)[0]
    prop.relevance(x[0], up, reference=y)
    with pytest.raises(ValueError, match="does not reproduce"):
        prop.relevance(x[0], up, reference=y + 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        prop.relevance(x[0], up[:, :, :1])


# ------------------------------------------------------------------------------------------------ maps
def test_overlap_matrix_columns_sum_to_one_and_identity():
    for n_in, n_out in [(7, 3), (224, 120), (5, 5), (3, 8), (336, 180)]:
        a = overlap_matrix(n_in, n_out)
        np.testing.assert_allclose(a.sum(0), 1.0, rtol=1e-12)
        assert (a >= 0).all()
    np.testing.assert_array_equal(overlap_matrix(6, 6), np.eye(6))
    np.testing.assert_allclose(overlap_matrix(4, 2), [[1, 1, 0, 0], [0, 0, 1, 1]])
    np.testing.assert_allclose(overlap_matrix(2, 4), [[0.5, 0], [0.5, 0], [0, 0.5], [0, 0.5]])
    np.testing.assert_allclose(overlap_matrix(2, 3), [[2 / 3, 0], [1 / 3, 1 / 3], [0, 2 / 3]])


def test_block_sum_and_resize_preserve_the_sum():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 9, 10))
    b = block_sum(a, 3)
    assert b.shape == (3, 3, 4)
    np.testing.assert_allclose(b.sum((1, 2)), a.sum((1, 2)), rtol=1e-12)
    np.testing.assert_allclose(b[:, 0, 0], a[:, :3, :3].sum((1, 2)))
    np.testing.assert_allclose(b[:, 2, 3], a[:, 6:9, 9:].sum((1, 2)))  # partial edge block
    m = rng.normal(size=(2, 224, 336))
    g = to_image_grid(m, (480, 640), 256)
    assert g.shape == (2, *reduced_shape(480, 640, 256)) == (2, 160, 214)
    np.testing.assert_allclose(g.sum((1, 2)), m.sum((1, 2)), rtol=1e-10)
    full = to_image_grid(m, (120, 180), None)
    assert full.shape == (2, 120, 180)
    np.testing.assert_allclose(full.sum((1, 2)), m.sum((1, 2)), rtol=1e-10)
    same = to_image_grid(m, (224, 336), None)
    np.testing.assert_allclose(same, m, rtol=1e-12, atol=1e-12)


def test_reduced_shape_rules():
    assert reduced_shape(100, 200, 256) == (100, 200)
    assert reduced_shape(480, 640, 256) == (160, 214)
    assert reduced_shape(1000, 10, 256) == (250, 3)
    with pytest.raises(ValueError, match="max_side"):
        reduced_shape(10, 10, 0)


# ------------------------------------------------------------------------------------------- bad input
def test_unknown_composite_is_one_clear_line():
    with pytest.raises(ValueError) as exc:
        resolve_composite("EpsilonPlusFlatt")
    msg = str(exc.value)
    assert "\n" not in msg and "EpsilonPlusFlatt" in msg and "EpsilonPlusFlat," in msg
    with pytest.raises(ValueError, match="unknown composite"):
        BackbonePropagator(_Detr(_resnet18(width=8)), composite="LRP-0")


def test_a_module_without_a_known_backbone_is_refused():
    class NoBackbone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3))
            self.input_proj = nn.Conv2d(4, 4, 1)

    with pytest.raises(ValueError, match="cannot find the CNN"):
        BackbonePropagator(NoBackbone())


def test_composite_identity_names_what_changes_numbers():
    ident = BackbonePropagator(_Detr(_resnet18(width=8)), composite="EpsilonGammaBox").identity()
    assert ident["pixel_name"] == "EpsilonGammaBox" and ident["pixel_gamma"] == 0.25
    assert ident["pixel_dtype"] == "float32" and ident["zennit_version"]
    assert resolve_composite("EpsilonPlusFlat").identity() != resolve_composite("EpsilonGammaBox").identity()


@pytest.mark.parametrize("name", [*NAMED, "EpsilonFlat"])
def test_explicit_walk_equals_the_autograd_path(detr16, name):
    """The explicit walk (default for our layout) and zennit's hooks under autograd with batched gradients."""
    walk = BackbonePropagator(detr16, composite=name, dtype=torch.float64)
    hooks = BackbonePropagator(detr16, composite=name, dtype=torch.float64, walk=False)
    assert walk.walk and not hooks.walk
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    up = _upstream(walk, x, 3)
    a, b = walk.relevance(x[0], up), hooks.relevance(x[0], up)
    assert float((a - b).abs().max() / b.abs().max()) < 1e-10
