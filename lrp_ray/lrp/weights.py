"""Plain views of a DETR transformer's parameters, found by structure (layer attributes), not class."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class AttnWeights:
    wq: Tensor
    wk: Tensor
    wv: Tensor
    bq: Tensor
    bk: Tensor
    bv: Tensor
    wo: Tensor
    bo: Tensor
    nheads: int


@dataclass
class NormWeights:
    gamma: Tensor
    beta: Tensor
    eps: float


@dataclass
class FfnWeights:
    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor


@dataclass
class EncoderLayerWeights:
    """An encoder layer's parameters; ``norm1``/``norm2`` as the module names them, the role properties
    (``attn_norm``, ``ffn_norm``, ``out_norm``) by what each LayerNorm feeds."""

    attn: AttnWeights
    norm1: NormWeights
    norm2: NormWeights
    ffn: FfnWeights
    pre_norm: bool = False

    @property
    def attn_norm(self) -> NormWeights | None:
        """The LayerNorm feeding the attention (pre-norm only)."""
        return self.norm1 if self.pre_norm else None

    @property
    def ffn_norm(self) -> NormWeights:
        """The LayerNorm of ``x + attention`` that feeds the FFN."""
        return self.norm2 if self.pre_norm else self.norm1

    @property
    def out_norm(self) -> NormWeights | None:
        """The LayerNorm producing the layer output (post-norm only)."""
        return None if self.pre_norm else self.norm2


@dataclass
class DecoderLayerWeights:
    """A decoder layer's parameters; ``norm1..3`` as the module names them, the role properties
    (``self_attn_norm``, ``cross_attn_norm``, ``ffn_norm``, ``out_norm``) by what each LayerNorm feeds."""

    self_attn: AttnWeights
    cross_attn: AttnWeights
    norm1: NormWeights
    norm2: NormWeights
    norm3: NormWeights
    ffn: FfnWeights
    pre_norm: bool = False

    @property
    def self_attn_norm(self) -> NormWeights | None:
        """The LayerNorm feeding the self-attention (pre-norm only)."""
        return self.norm1 if self.pre_norm else None

    @property
    def cross_attn_norm(self) -> NormWeights:
        """The LayerNorm whose output queries the memory."""
        return self.norm2 if self.pre_norm else self.norm1

    @property
    def ffn_norm(self) -> NormWeights:
        """The LayerNorm that feeds the FFN."""
        return self.norm3 if self.pre_norm else self.norm2

    @property
    def out_norm(self) -> NormWeights | None:
        """The LayerNorm producing the layer output (post-norm only)."""
        return None if self.pre_norm else self.norm3


@dataclass
class TransformerWeights:
    encoder: list[EncoderLayerWeights]
    decoder: list[DecoderLayerWeights]
    encoder_norm: NormWeights | None
    decoder_norm: NormWeights | None
    pre_norm: bool
    hidden_dim: int
    nheads: int
    dim_ff: int


def _zeros_like_bias(w: Tensor) -> Tensor:
    return torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)


def _attn(m: nn.Module) -> AttnWeights:
    if not isinstance(m, nn.MultiheadAttention) and not hasattr(m, "in_proj_weight"):
        raise TypeError(f"expected an nn.MultiheadAttention-like module, got {type(m).__name__}")
    d = m.embed_dim
    if getattr(m, "in_proj_weight", None) is not None:
        wq, wk, wv = m.in_proj_weight.detach().split(d, dim=0)
    else:  # separate projection weights (kdim/vdim != embed_dim)
        wq, wk, wv = (m.q_proj_weight.detach(), m.k_proj_weight.detach(), m.v_proj_weight.detach())
    if getattr(m, "in_proj_bias", None) is not None:
        bq, bk, bv = m.in_proj_bias.detach().split(d, dim=0)
    else:
        bq, bk, bv = _zeros_like_bias(wq), _zeros_like_bias(wk), _zeros_like_bias(wv)
    bo = m.out_proj.bias.detach() if m.out_proj.bias is not None else _zeros_like_bias(m.out_proj.weight)
    return AttnWeights(wq, wk, wv, bq, bk, bv, m.out_proj.weight.detach(), bo, int(m.num_heads))


def _norm(m: nn.Module) -> NormWeights:
    d = m.normalized_shape[-1]
    gamma = m.weight.detach() if m.weight is not None else torch.ones(d)
    beta = m.bias.detach() if m.bias is not None else torch.zeros(d)
    return NormWeights(gamma, beta, float(m.eps))


def _ffn(layer: nn.Module) -> FfnWeights:
    l1, l2 = layer.linear1, layer.linear2
    b1 = l1.bias.detach() if l1.bias is not None else _zeros_like_bias(l1.weight)
    b2 = l2.bias.detach() if l2.bias is not None else _zeros_like_bias(l2.weight)
    return FfnWeights(l1.weight.detach(), b1, l2.weight.detach(), b2)


def _pre_norm(layer: nn.Module) -> bool:
    return bool(getattr(layer, "normalize_before", False))


def extract_weights(transformer: nn.Module) -> TransformerWeights:
    """Read the parameters of a DETR-reference transformer (``encoder.layers``, ``decoder.layers``)."""
    try:
        enc_layers = list(transformer.encoder.layers)
        dec_layers = list(transformer.decoder.layers)
    except AttributeError as exc:
        raise TypeError("not a DETR transformer: expected .encoder.layers and .decoder.layers") from exc
    for layer in enc_layers + dec_layers:
        act = getattr(layer, "activation", None)
        if act is not None and callable(act) and getattr(act, "__name__", "relu") not in ("relu",):
            raise NotImplementedError(f"only ReLU feed-forward activations are supported, got {act}")
    pre = {_pre_norm(ly) for ly in enc_layers + dec_layers}
    if len(pre) > 1:
        raise NotImplementedError("mixed pre-norm and post-norm layers are not supported")
    pre_norm = bool(next(iter(pre), False))
    encoder = [EncoderLayerWeights(_attn(ly.self_attn), _norm(ly.norm1), _norm(ly.norm2), _ffn(ly), pre_norm)
               for ly in enc_layers]
    decoder = [DecoderLayerWeights(_attn(ly.self_attn), _attn(ly.multihead_attn), _norm(ly.norm1),
                                   _norm(ly.norm2), _norm(ly.norm3), _ffn(ly), pre_norm) for ly in dec_layers]
    enc_norm = getattr(transformer.encoder, "norm", None)
    dec_norm = getattr(transformer.decoder, "norm", None)
    first = encoder[0] if encoder else None
    if first is None:
        raise TypeError("the transformer has no encoder layers")
    return TransformerWeights(
        encoder=encoder, decoder=decoder,
        encoder_norm=_norm(enc_norm) if enc_norm is not None else None,
        decoder_norm=_norm(dec_norm) if dec_norm is not None else None,
        pre_norm=pre_norm, hidden_dim=int(first.attn.wq.shape[1]), nheads=first.attn.nheads,
        dim_ff=int(first.ffn.w1.shape[0]),
    )


def cast_weights(w, dtype: torch.dtype, device: torch.device):
    """Recursively cast every tensor of a weights dataclass."""
    if isinstance(w, Tensor):
        return w.to(device=device, dtype=dtype)
    if isinstance(w, list):
        return [cast_weights(x, dtype, device) for x in w]
    if hasattr(w, "__dataclass_fields__"):
        return type(w)(**{k: cast_weights(getattr(w, k), dtype, device) for k in w.__dataclass_fields__})
    return w
