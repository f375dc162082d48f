"""Detection targets: relevance that starts at one object query's pre-softmax class logit.

A detection is (image, query, class_id). Its relevance starts at the logit ``z = W_c . hs_q + b_c`` of the
class head, crosses the class head (epsilon rule) and the decoder's final norm (if the model has one, the
rule set's layer-norm rule) and then the decoder and encoder stacks (:func:`propagate_from`, the layer
backward of :mod:`.propagate`), down to the encoder input tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..queries import top_k
from .cache import ForwardCache
from .forward import layer_norm
from .propagate import Ledger, Visit, propagate_from
from .rules import RuleSet

__all__ = ["DetectionSet", "DetectionSelection", "parse_selection", "resolve_class_name", "select_detections",
           "logit_start", "propagate_from", "Visit"]

DetectionSelection = str | Sequence[tuple[int, int]]
"""``'topK'``, ``'score>=X'``, ``'class=C'`` or explicit ``(query, class_id)`` pairs."""

_SCORE = re.compile(r"\s*score\s*>=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*")
_CLASS = re.compile(r"\s*class\s*=\s*(\d+)\s*")
_CLASS_NAME = re.compile(r"\s*class\s*=\s*(.+?)\s*", re.S)


@dataclass
class DetectionSet:
    """The detections of one image batch, padded per image to ``[B, M]`` (``query`` -1 = no target).

    ``scores``/``boxes`` are the model's (max non-object softmax probability; xyxy pixels of the original
    image); ``no_detections`` lists the images where nothing passed the selection.
    """

    query: np.ndarray          # [B, M] int64, -1 = padding
    class_id: np.ndarray       # [B, M] int64
    score: np.ndarray          # [B, M] float32 (probability of class_id)
    boxes: np.ndarray          # [B, M, 4] float32
    no_detections: list[int] = field(default_factory=list)

    @property
    def valid(self) -> np.ndarray:
        """[B, M] bool: a real detection (not padding)."""
        return self.query >= 0

    @property
    def width(self) -> int:
        return int(self.query.shape[1])

    def items(self) -> list[tuple[int, int]]:
        """(image, slot) of every real detection, image-major."""
        return [(int(b), int(m)) for b, m in zip(*np.nonzero(self.valid), strict=True)]


def resolve_class_name(selection: DetectionSelection,
                       class_names: Sequence[str] | None) -> DetectionSelection:
    """``'class=<name>'`` -> ``'class=<id>'`` by ``class_names`` (ValueError naming the known names);
    every other selection unchanged."""
    if not isinstance(selection, str) or _CLASS.fullmatch(selection):
        return selection
    m = _CLASS_NAME.fullmatch(selection)
    if not m:
        return selection
    name = m.group(1)
    if not class_names:
        raise ValueError(f"detections {selection!r}: a class name needs class names (give class ids, or "
                         f"class names with the model)")
    if name not in class_names:
        known = ", ".join(repr(n) for n in list(class_names)[:20])
        raise ValueError(f"detections {selection!r}: unknown class {name!r} (known: {known})")
    return f"class={list(class_names).index(name)}"


def parse_selection(selection: DetectionSelection, num_queries: int,
                    num_classes: int) -> tuple[str, Any]:
    """A checked selection: ``("top", k)``, ``("score", t)``, ``("class", c)`` or ``("pairs", [...])``.

    Raises ValueError with one line for malformed strings and out-of-range queries or class ids.
    """
    if isinstance(selection, str):
        k = top_k(selection)
        if k is not None:
            if k > num_queries:
                raise ValueError(f"detections 'top{k}': k must be in 1..{num_queries}")
            return "top", k
        m = _SCORE.fullmatch(selection)
        if m:
            t = float(m.group(1))
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"detections score threshold must be in [0, 1], got {t}")
            return "score", t
        m = _CLASS.fullmatch(selection)
        if m:
            c = int(m.group(1))
            if not 0 <= c < num_classes:
                raise ValueError(f"detections class id {c} out of range: valid ids are 0..{num_classes - 1}")
            return "class", c
        raise ValueError(f"detections must be 'topK', 'score>=X', 'class=C' or (query, class_id) pairs, "
                         f"got {selection!r}")
    try:
        pairs = [(int(q), int(c)) for q, c in selection]
    except (TypeError, ValueError):
        raise ValueError(f"detections must be 'topK', 'score>=X', 'class=C' or (query, class_id) pairs, "
                         f"got {selection!r}") from None
    if not pairs:
        raise ValueError("detections: no (query, class_id) pairs given")
    for q, c in pairs:
        if not 0 <= q < num_queries:
            raise ValueError(f"detection query {q} out of range: valid queries are 0..{num_queries - 1}")
        if not 0 <= c < num_classes:
            raise ValueError(f"detection class id {c} out of range: valid ids are 0..{num_classes - 1}")
    return "pairs", list(dict.fromkeys(pairs))


def select_detections(cache: ForwardCache, selection: DetectionSelection) -> DetectionSet:
    """The detections ``selection`` picks in each image of ``cache`` (by score, highest first).

    ``topK``/``score>=X`` use each query's most probable object class (never the no-object class);
    ``class=C`` picks the queries whose prediction is C (queries predicting no-object are not
    detections); pairs explain the given class of the given query in every image.
    """
    from ..models.postprocess import box_cxcywh_to_xyxy

    logits = cache.pred_logits.detach().float()
    b, nq, c1 = logits.shape
    kind, arg = parse_selection(selection, nq, c1 - 1)
    probs = logits.softmax(-1)[..., :-1].cpu()
    best, label = probs.max(-1)
    full = logits.argmax(-1).cpu().numpy()
    boxes = box_cxcywh_to_xyxy(cache.pred_boxes.detach().float().cpu())
    sizes = cache.meta.get("image_sizes")
    rows: list[list[tuple[int, int, float]]] = []
    for i in range(b):
        s, lab = best[i].numpy(), label[i].numpy()
        order = np.argsort(-s, kind="stable")
        if kind == "top":
            picks = [(int(q), int(lab[q])) for q in order[:arg]]
        elif kind == "score":
            picks = [(int(q), int(lab[q])) for q in order if s[q] >= arg]
        elif kind == "class":  # the query's prediction (no-object included) is the class
            picks = [(int(q), arg) for q in order if full[i, q] == arg]
        else:
            picks = list(arg)
        rows.append([(q, cl, float(probs[i, q, cl])) for q, cl in picks])
    m = max([len(r) for r in rows] + [1])
    query = np.full((b, m), -1, np.int64)
    class_id = np.zeros((b, m), np.int64)
    score = np.zeros((b, m), np.float32)
    box = np.zeros((b, m, 4), np.float32)
    for i, r in enumerate(rows):
        h, w = (sizes[i] if sizes is not None else (1, 1))
        scale = torch.tensor([w, h, w, h], dtype=boxes.dtype)
        for k, (q, cl, sc) in enumerate(r):
            bx = boxes[i, q] * scale
            bx[0::2] = bx[0::2].clamp(0, w)
            bx[1::2] = bx[1::2].clamp(0, h)
            query[i, k], class_id[i, k], score[i, k], box[i, k] = q, cl, sc, bx.numpy()
    return DetectionSet(query=query, class_id=class_id, score=score, boxes=box,
                        no_detections=[i for i, r in enumerate(rows) if not r])


def logit_start(cache: ForwardCache, rules: RuleSet, dets: DetectionSet, class_weight: Tensor,
                class_bias: Tensor, norm: Any, gdtype: torch.dtype, ledger: Ledger) -> tuple[Tensor, Tensor]:
    """g at the last decoder layer's output [B, Q, M, d] for the detections' class logits, and the logits
    [B, M] (the relevance they start with; 0 for padding).

    The class bias's share and the decoder norm's shift go to ``ledger.bias``.
    """
    dev = cache.device
    last = cache.decoder_out.to(gdtype)
    if norm is not None:
        hs, rstd = layer_norm(last, norm)
    else:
        hs, rstd = last, None
    bsz, nq, d = hs.shape
    m = dets.width
    q = torch.as_tensor(np.where(dets.valid, dets.query, 0), device=dev)
    cl = torch.as_tensor(dets.class_id, device=dev)
    valid = torch.as_tensor(dets.valid, device=dev).to(gdtype)
    wc = class_weight.to(dev, gdtype)[cl] * valid[..., None]                  # [B, M, d]
    bc = class_bias.to(dev, gdtype)[cl] * valid                               # [B, M]
    ar = torch.arange(bsz, device=dev)[:, None]
    z = (hs[ar, q] * wc).sum(-1) + bc                                         # [B, M]
    # the head's epsilon rule: one logit per target; its g reaches hs only at the detection's query
    scale = _logit_stab(z, rules.epsilon)                                    # [B, M]
    g = torch.zeros(bsz, nq, m, d, dtype=gdtype, device=dev)
    for k in range(m):
        g[ar[:, 0], q[:, k], k] = wc[:, k] * scale[:, k, None]
    ledger.bias = ledger.bias + bc * scale
    if norm is not None:
        g, b = rules.layer_norm(g, hs, rstd, norm.gamma.to(gdtype), norm.beta.to(gdtype))
        ledger.bias = ledger.bias + b
    return g, z


def _logit_stab(z: Tensor, eps: float) -> Tensor:
    """The epsilon factor ``z / (z + eps sign z)`` of each logit [B, M] (1 for eps 0)."""
    if eps == 0:
        return torch.ones_like(z)
    sign = torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
    return z / (z + eps * sign)


"""Called with (module, layer, g at the layer output, g of the memory (decoder) or None, ledger) before
the layer is crossed; may return a replacement (g, g_mem, ledger)."""


