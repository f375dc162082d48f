"""Model forward, position encoding, postprocess, and from_module on ours and on foreign DETRs."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lrp_ray.models import DetrConfig, DetrParts, build_model, detections, from_module
from lrp_ray.models.locate import DetrNotFoundError
from lrp_ray.models.position_encoding import PositionEmbeddingSine


def tiny_model():
    """The random-weight stand-in (independent of the bundled demo model)."""
    from lrp_ray.models.build import demo_config

    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return build_model(demo_config())


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 96, 128, generator=g)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 60:, :] = True
    mask[1, :, 100:] = True
    x[mask.unsqueeze(1).expand_as(x)] = 0
    return x, mask


def test_forward_shapes_and_mask() -> None:
    model = tiny_model()
    x, mask = padded_batch()
    with torch.no_grad():
        out = model(x, mask)
        src, pos, fmask = model.encoder_inputs(x, mask)
    assert out["pred_logits"].shape == (2, 20, 6) and out["pred_boxes"].shape == (2, 20, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert len(out["aux_outputs"]) == 2
    assert all(a["pred_logits"].shape == (2, 20, 6) for a in out["aux_outputs"])
    assert src.shape == pos.shape == (2, 64, 3, 4) and fmask.shape == (2, 3, 4)
    # detectron2 wrapper mask: valid ceil(60/32)=2 rows, ceil(100/32)=4 columns.
    assert not fmask[0].any()
    assert fmask[1].tolist() == [[False] * 4, [False] * 4, [True] * 4]
    # Outputs are the heads on the last (normed) decoder state.
    with torch.no_grad():
        hs = model.transformer(src, fmask, model.query_embed.weight, pos)[0]
        assert torch.allclose(model.class_embed(hs[-1]), out["pred_logits"], atol=1e-6)
        assert torch.allclose(model.class_embed(hs[0]), out["aux_outputs"][0]["pred_logits"], atol=1e-6)


def test_position_embedding_by_hand() -> None:
    pe = PositionEmbeddingSine(num_pos_feats=4, normalize=True)
    mask = torch.zeros(1, 3, 5, dtype=torch.bool)
    mask[0, :, 4:] = True
    pos = pe(torch.zeros(1, 8, 3, 5), mask)
    assert pos.shape == (1, 8, 3, 5)
    i, j = 1, 2
    y = (i + 1) / (3 + 1e-6) * 2 * math.pi
    x = (j + 1) / (4 + 1e-6) * 2 * math.pi
    t = 10000 ** (2 / 4)  # dim_t for features 2 and 3
    expect = [math.sin(y), math.cos(y), math.sin(y / t), math.cos(y / t),
              math.sin(x), math.cos(x), math.sin(x / t), math.cos(x / t)]
    assert torch.allclose(pos[0, :, i, j], torch.tensor(expect), atol=1e-5)


def test_detections_by_hand() -> None:
    logits = torch.tensor([[[0.0, 0.0, 10.0], [5.0, 0.0, 0.0], [0.0, 3.0, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.2, 0.4], [0.95, 0.5, 0.2, 0.2]]])
    (det,) = detections(logits, boxes, [(100, 200)])
    assert det["query"].tolist() == [1, 2, 0]
    assert det["labels"].tolist() == [0, 1, 0]
    e5, e3 = math.exp(5), math.exp(3)
    assert np.allclose(det["scores"][:2], [e5 / (e5 + 2), e3 / (e3 + 2)])
    assert np.allclose(det["boxes"][0], [80, 30, 120, 70])
    assert np.allclose(det["boxes"][1], [170, 40, 200, 60])  # clipped at the right edge
    assert det["scores"].dtype == np.float32 and det["boxes"].dtype == np.float32
    (top,) = detections(logits, boxes, [(100, 200)], score_threshold=0.95)
    assert top["query"].tolist() == [1]


def test_from_module_on_our_detr() -> None:
    model = tiny_model()
    parts = from_module(model)
    assert isinstance(parts, DetrParts) and parts.module is model
    assert (parts.hidden_dim, parts.nheads, parts.num_queries, parts.num_classes) == (64, 4, 20, 5)
    assert parts.pre_norm is False and parts.transformer is model.transformer
    assert parts.encoder_inputs == model.encoder_inputs
    pre = build_model(DetrConfig(hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=16,
                                 num_queries=3, num_classes=2, resnet_depth=18, stem_out_channels=8,
                                 res2_out_channels=8, pre_norm=True))
    assert from_module(pre).pre_norm is True


# --- A foreign class hierarchy (not derived from ours) that reuses our submodules --------------------


class ForeignNested:
    def __init__(self, tensors: torch.Tensor, mask: torch.Tensor) -> None:
        self.tensors, self.mask = tensors, mask

    def decompose(self):
        return self.tensors, self.mask


class D2MaskedBackbone(nn.Module):
    """detectron2-wrapper style: takes an ImageList (.tensor, .image_sizes), mask from ceil(size/stride)."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.backbone = resnet

    def forward(self, images):
        feat = self.backbone(images.tensor)
        n, _, h, w = feat.shape
        mask = torch.ones((n, h, w), dtype=torch.bool)
        for i, (ih, iw) in enumerate(images.image_sizes):
            mask[i, : int(np.ceil(ih / 32)), : int(np.ceil(iw / 32))] = False
        return [ForeignNested(feat, mask)]


class ReferenceBackbone(nn.Module):
    """DETR-reference style: takes a NestedTensor, mask interpolated to the feature size."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.body = resnet

    def forward(self, tensor_list):
        x = self.body(tensor_list.tensors)
        mask = F.interpolate(tensor_list.mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
        return {"0": ForeignNested(x, mask)}


class ForeignJoiner(nn.Sequential):
    def forward(self, samples):
        xs = self[0](samples)
        xs = list(xs.values()) if isinstance(xs, dict) else xs
        return xs, [self[1](x).to(x.tensors.dtype) for x in xs]


class ForeignDETR(nn.Module):
    def __init__(self, ours: nn.Module, backbone: nn.Module) -> None:
        super().__init__()
        self.transformer = copy.deepcopy(ours.transformer)
        self.class_embed = copy.deepcopy(ours.class_embed)
        self.bbox_embed = copy.deepcopy(ours.bbox_embed)
        self.query_embed = copy.deepcopy(ours.query_embed)
        self.input_proj = copy.deepcopy(ours.input_proj)
        self.backbone = ForeignJoiner(backbone, PositionEmbeddingSine(32, normalize=True))

    def forward(self, samples):
        features, pos = self.backbone(samples)
        src, mask = features[-1].decompose()
        hs = self.transformer(self.input_proj(src), mask, self.query_embed.weight, pos[-1])[0]
        return {"pred_logits": self.class_embed(hs)[-1], "pred_boxes": self.bbox_embed(hs).sigmoid()[-1]}


class Detr(nn.Module):
    """Stands in for detectron2's meta-architecture wrapper: the DETR lives at ``.detr``."""

    def __init__(self, detr: nn.Module) -> None:
        super().__init__()
        self.detr = detr
        self.register_buffer("pixel_mean", torch.zeros(3))


def test_from_module_on_foreign_detectron2_wrapper() -> None:
    ours = tiny_model()
    wrapper = Detr(ForeignDETR(ours, D2MaskedBackbone(copy.deepcopy(ours.backbone[0].backbone)))).eval()
    parts = from_module(wrapper)
    assert parts.module is wrapper.detr and not isinstance(parts.module, type(ours))
    assert (parts.hidden_dim, parts.nheads, parts.num_queries, parts.num_classes) == (64, 4, 20, 5)
    x, mask = padded_batch(1)
    with torch.no_grad():
        got = parts.encoder_inputs(x, mask)
        want = ours.encoder_inputs(x, mask)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and torch.equal(g, w)


def test_from_module_on_foreign_reference_detr() -> None:
    ours = tiny_model()
    foreign = ForeignDETR(ours, ReferenceBackbone(copy.deepcopy(ours.backbone[0].backbone))).eval()
    parts = from_module(foreign)
    assert parts.module is foreign
    x = torch.randn(1, 3, 100, 100)
    mask = torch.zeros(1, 100, 100, dtype=torch.bool)
    mask[0, 60:] = True
    with torch.no_grad():
        src, pos, fmask = parts.encoder_inputs(x, mask)
        feat = ours.backbone[0].backbone(x)
    # Reference convention: nearest-interpolated mask (rows 0, 25, 50 valid), not detectron2's ceil (2 rows).
    assert fmask[0, :, 0].tolist() == [False, False, False, True]
    assert torch.equal(src, ours.input_proj(feat).detach())
    assert torch.equal(pos, PositionEmbeddingSine(32)(feat, fmask))


def test_from_module_errors() -> None:
    with pytest.raises(DetrNotFoundError, match="no DETR transformer found in Sequential"):
        from_module(nn.Sequential(nn.Linear(2, 2)))
    broken = tiny_model()
    del broken.transformer.decoder.layers[0].norm3
    with pytest.raises(DetrNotFoundError, match=r"decoder\.layers\[0\] lacks norm3"):
        from_module(broken)


def test_resnet_variants_dc5_and_stride_in_1x1() -> None:
    base = dict(resnet_depth=50, stem_out_channels=8, res2_out_channels=32, width_per_group=8, hidden_dim=16,
                nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=16, num_queries=2)
    dc5 = build_model(DetrConfig(**base, res5_dilation=2))
    res5 = dc5.backbone[0].backbone.res5[0]
    assert dc5.backbone[0].stride == 16 and res5.conv2.dilation == (2, 2) and res5.conv2.stride == (1, 1)
    x = torch.zeros(1, 3, 64, 96)
    mask = torch.zeros(1, 64, 96, dtype=torch.bool)
    mask[0, :, 40:] = True
    with torch.no_grad():
        src, _, fmask = dc5.encoder_inputs(x, mask)
    assert src.shape == (1, 16, 4, 6) and fmask[0, 0].tolist() == [False] * 3 + [True] * 3  # ceil(40/16)
    s1 = build_model(DetrConfig(**base, stride_in_1x1=True)).backbone[0].backbone.res3[0]
    s3 = build_model(DetrConfig(**base)).backbone[0].backbone.res3[0]
    assert (s1.conv1.stride, s1.conv2.stride) == ((2, 2), (1, 1))
    assert (s3.conv1.stride, s3.conv2.stride) == ((1, 1), (2, 2))
