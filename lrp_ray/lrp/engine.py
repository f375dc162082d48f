"""LrpEngine: one forward per image batch, then relevance for many targets from the cache."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .cache import ForwardCache
from .forward import layer_norm, run_forward
from .propagate import Ledger, profile_names, propagate
from .result import RelevanceResult
from .rules import RuleSet, token_dot
from .targets import EncoderStart, QuerySpec, decoder_start, select_queries
from .weights import TransformerWeights, cast_weights, extract_weights

if TYPE_CHECKING:
    from .concepts import ConditionalMaps, DetectionRelevance
    from .detections import DetectionSelection, DetectionSet

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
MODULES = ("encoder", "decoder")


NUMERICS_VERSION = 2
"""Version of the arithmetic behind :meth:`LrpEngine.numerics`; bumped whenever a change in the engine
(rules, products, blocking of per-token maps, chunking) can change results for the same request."""

DEFAULT_CHUNK_BUDGET_BYTES = 1 << 30
DEFAULT_MAPS_BUDGET_BYTES = 4 << 30


@dataclass
class EngineConfig:
    """How relevance is computed. ``precision`` fp64 exists for verification.

    Reproducibility: every choice that changes numbers (feature chunking, folded FFN maps or not, the
    layers that get maps) is a fixed function of the request (cache geometry, module, layer, targets)
    and of this config's fields, never of the machine (RAM, GPU memory, thread count, actor budgets).
    Results are bitwise reproducible for the same request on the same device type and library build;
    CPU and CUDA (and different torch/BLAS builds) differ in the last digits. :meth:`LrpEngine.numerics`
    lists the constants that decide the numbers.
    """

    rules: str = "cp"
    epsilon: float = 1e-6
    precision: str = "fp32"
    device: str = "auto"
    compile: bool = False
    memory_budget_bytes: int = 1 << 30
    """Deprecated and ignored (it used to size feature chunks, which made results depend on the
    machine); accepted so older callers keep working. Chunks follow ``chunk_budget_bytes``."""
    ffn_maps: bool = True
    """Fold FFN blocks into per-token maps for calls with >= hidden_dim/4 targets (on every device)."""
    forward_precision: str = "auto"
    """Precision of the forward pass that fills the cache; ``auto``: fp32 for the half precisions (their
    relevance then stays within ~1-2 % of fp32 where a bf16 forward can be ~10 % off for decoder
    targets; the propagation, nearly all the work, still runs its matrix products in ``precision``)."""
    maps_budget_bytes: int | None = DEFAULT_MAPS_BUDGET_BYTES
    """Nominal bytes of per-token maps per cache: which layers get maps (a fixed constant, not derived
    from the machine's memory; None means the default)."""
    chunk_budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES
    """Nominal bytes per propagation call that size the feature chunks (:meth:`LrpEngine.
    max_feature_chunk`); a fixed constant so chunking, and so the float results, depend on the request
    only. The actual peak memory of a call scales with it."""

    def __post_init__(self) -> None:
        RuleSet(self.rules, self.epsilon)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.forward_precision != "auto" and self.forward_precision not in PRECISIONS:
            raise ValueError(f"forward_precision must be auto or one of {', '.join(PRECISIONS)}, "
                             f"got {self.forward_precision!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.maps_budget_bytes is None:
            self.maps_budget_bytes = DEFAULT_MAPS_BUDGET_BYTES
        if int(self.maps_budget_bytes) < 0:
            raise ValueError(f"maps_budget_bytes must be >= 0, got {self.maps_budget_bytes}")
        if int(self.chunk_budget_bytes) < 1:
            raise ValueError(f"chunk_budget_bytes must be >= 1, got {self.chunk_budget_bytes}")


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available")
    return torch.device(device)


_PART_MODULES = ("transformer", "input_proj", "query_embed", "class_embed", "bbox_embed")


def _private(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The engine's own copy of ``module``: on ``device``, in eval mode, without gradients."""
    own = copy.deepcopy(module).to(device).eval()
    own.requires_grad_(False)
    return own


def _own_parts(model_or_parts: Any, device: torch.device) -> Any:
    """The DETR parts of a model (or of given parts) as the engine's private copy: the caller's modules
    keep their device, dtype, ``training`` flag and parameters whatever the engine does."""
    from ..models.locate import from_module  # models know nothing of LRP; the engine reads models

    if isinstance(model_or_parts, torch.nn.Module):
        return from_module(_private(from_module(model_or_parts).module, device))
    module = getattr(model_or_parts, "module", None)
    if isinstance(module, torch.nn.Module):  # DetrParts of a model (e.g. another engine's)
        return from_module(_private(module, device))
    if not all(hasattr(model_or_parts, a) for a in ("transformer", "query_embed", "encoder_inputs")):
        raise TypeError(f"expected a DETR nn.Module or its parts (transformer, query_embed, encoder_inputs, "
                        f"...), got {type(model_or_parts).__name__}")
    parts = copy.copy(model_or_parts)  # bare parts (no backbone): copy the modules the engine uses
    for name in _PART_MODULES:
        m = getattr(parts, name, None)
        if isinstance(m, torch.nn.Module):
            setattr(parts, name, _private(m, device))
    return parts


class LrpEngine:
    """Relevance for (module, layer, features, queries) targets over cached forward passes.

    The engine works on its own copy of the model (moved to its device, in eval mode); the model passed
    in is not modified.
    """

    def __init__(self, model_or_parts: Any, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.device = resolve_device(self.config.device)
        self.parts = _own_parts(model_or_parts, self.device)
        self.dtype = PRECISIONS[self.config.precision]
        self.rules = RuleSet(self.config.rules, self.config.epsilon)
        base = extract_weights(self.parts.transformer)
        acc = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.weights: TransformerWeights = cast_weights(base, self.dtype, self.device)
        half = (torch.bfloat16, torch.float16)
        fwd = self.config.forward_precision
        self.forward_dtype = (torch.float32 if self.dtype in half else self.dtype) if fwd == "auto" \
            else PRECISIONS[fwd]
        self._forward_weights = self.weights if self.forward_dtype == self.dtype \
            else cast_weights(base, self.forward_dtype, self.device)
        self._norm_acc = cast_weights(base.decoder_norm, acc, self.device) if base.decoder_norm else None
        self._acc = acc
        # g (the relevance carrier) stays in fp32 for half precisions; matmuls run in the compute dtype
        self._gdtype = acc if self.dtype in (torch.bfloat16, torch.float16) else self.dtype
        # fixed constants (never the machine's memory): the same request computes the same numbers
        self.maps_budget = int(self.config.maps_budget_bytes)
        # building a layer's maps costs about as much as d/4 direct targets on CPU (open ReLU units only);
        # one threshold on every device, so the path a request takes never depends on the machine
        self.maps_min_targets = max(1, self.weights.hidden_dim // 4)
        self._propagate = propagate
        if self.config.compile:
            self._propagate = torch.compile(propagate, dynamic=True)

    def numerics(self) -> dict[str, Any]:
        """The JSON-able constants that decide the numbers of :meth:`relevance` (for a result hash).

        Two engines with equal ``numerics()`` compute bitwise-equal results for the same request on the
        same device type and library build (CPU and CUDA differ in the last digits).
        """
        names = {v: k for k, v in PRECISIONS.items()}
        return {
            "numerics_version": NUMERICS_VERSION,
            "rules": self.rules.name,
            "rule_ops": self.rules.ops.as_dict(),
            "epsilon": float(self.rules.epsilon),
            "precision": self.config.precision,
            "forward_precision": names[self.forward_dtype],
            "chunk_budget_bytes": int(self.config.chunk_budget_bytes),
            "maps_budget_bytes": int(self.maps_budget),
            "maps_min_targets": int(self.maps_min_targets),
            "ffn_maps": bool(self.config.ffn_maps),
            "compile": bool(self.config.compile),
        }

    # ----------------------------------------------------------------------------------- forward
    def _autocast(self):
        if self.forward_dtype in (torch.bfloat16, torch.float16):
            return torch.autocast(device_type=self.device.type, dtype=self.forward_dtype)
        return contextlib.nullcontext()

    @torch.no_grad()
    def forward(self, batch: Any) -> ForwardCache:
        """Backbone + encoder + decoder once for an ``ImageBatch``; the cache serves every target."""
        src, pos, mask = self.encoder_inputs(batch)
        cache = self.forward_tokens(src, pos, mask)
        cache.meta["image_sizes"] = [list(map(int, s)) for s in batch.image_sizes]
        return cache

    @torch.no_grad()
    def encoder_inputs(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Backbone + input_proj per group of equally sized images, padded on the feature grid.

        Running the backbone on each image's own extent (not on the zero-padded batch) makes every
        image's tokens, and so its relevance, independent of the other images in its batch.
        """
        groups: dict[tuple[int, int], list[int]] = {}
        for i, hw in enumerate(batch.input_sizes):
            groups.setdefault((int(hw[0]), int(hw[1])), []).append(i)
        outs: dict[int, tuple[Tensor, Tensor]] = {}
        with self._autocast():
            for (h, w), idx in groups.items():
                images = batch.tensor[idx, :, :h, :w].to(self.device)
                pad = torch.zeros(len(idx), h, w, dtype=torch.bool, device=self.device)
                src, pos, _ = self.parts.encoder_inputs(images, pad)
                for k, i in enumerate(idx):
                    outs[i] = (src[k], pos[k])
        b = len(batch.input_sizes)
        gh = max(s.shape[1] for s, _ in outs.values())
        gw = max(s.shape[2] for s, _ in outs.values())
        d = outs[0][0].shape[0]
        src = torch.zeros(b, d, gh, gw, dtype=outs[0][0].dtype, device=self.device)
        pos = torch.zeros(b, d, gh, gw, dtype=outs[0][1].dtype, device=self.device)
        mask = torch.ones(b, gh, gw, dtype=torch.bool, device=self.device)
        for i, (s, p) in outs.items():
            src[i, :, :s.shape[1], :s.shape[2]] = s
            pos[i, :, :s.shape[1], :s.shape[2]] = p
            mask[i, :s.shape[1], :s.shape[2]] = False
        return src, pos, mask

    @torch.no_grad()
    def forward_tokens(self, src: Tensor, pos: Tensor, mask: Tensor) -> ForwardCache:
        """Transformer forward from encoder input tokens ``src``/``pos`` [B,d,h,w] and ``mask`` [B,h,w]."""
        dev = self.device
        adt = self._gdtype  # activations (residual stream) stay in fp32 for half precisions
        qe = self.parts.query_embed.weight.detach().to(dev, adt)
        cache, last = run_forward(self._forward_weights, src.to(dev, adt), pos.to(dev, adt), mask.to(dev), qe)
        hs = last.to(self._acc)
        if self._norm_acc is not None:
            hs, _ = layer_norm(hs, self._norm_acc)
        pdtype = next(self.parts.class_embed.parameters()).dtype
        cache.pred_logits = self.parts.class_embed(hs.to(pdtype)).float()
        cache.pred_boxes = self.parts.bbox_embed(hs.to(pdtype)).sigmoid().float()
        cache.meta["precision"] = self.config.precision
        cache.meta["forward_precision"] = str(self.forward_dtype).removeprefix("torch.")
        return cache

    # ---------------------------------------------------------------------------------- relevance
    def validate(self, module: str, layer: int, features: Sequence[int]) -> None:
        """Raise ValueError naming the valid range for a bad target request."""
        if module not in MODULES:
            raise ValueError(f"module must be 'encoder' or 'decoder', got {module!r}")
        n_layers = len(self.weights.encoder if module == "encoder" else self.weights.decoder)
        if not 0 <= int(layer) < n_layers:
            raise ValueError(f"{module} layer {layer} out of range: valid layers are 0..{n_layers - 1}")
        d = self.weights.hidden_dim
        bad = [f for f in features if not 0 <= int(f) < d]
        if bad or len(features) == 0:
            raise ValueError(f"features must be in 0..{d - 1} (hidden_dim {d}), got {list(bad) or 'none'}")

    def bytes_per_target(self, cache: ForwardCache, module: str) -> int:
        """Estimated peak bytes one target adds to a propagation (memory grows linearly in targets)."""
        m = cache.meta
        b, (gh, gw) = cache.batch_size, m["grid"]
        t, d, dff, h = gh * gw, m["hidden_dim"], m["dim_ff"], m["nheads"]
        elem = torch.empty((), dtype=self.dtype).element_size()
        per = b * t * (dff + 6 * d)
        if module == "decoder":
            per += b * m["num_queries"] * (dff + 6 * d)
        if self.rules.attention_relevance:
            per += 3 * b * h * t * t
        return int(per * elem * 1.5)

    def max_feature_chunk(self, cache: ForwardCache, module: str, layer: int = 0, n_queries: int = 1,
                          budget_bytes: int | None = None) -> int:
        """Largest number of features per propagation whose estimated peak fits ``budget_bytes``
        (default: the fixed nominal ``config.chunk_budget_bytes``, what :meth:`relevance` uses).

        A function of the request only (cache geometry, module, targets per feature, precision, rules)
        and of the budget, so a request is chunked, and computes, the same way on every machine.
        """
        budget = self.config.chunk_budget_bytes if budget_bytes is None else budget_bytes
        per = self.bytes_per_target(cache, module) * max(1, n_queries)
        return int(max(1, min(self.weights.hidden_dim, budget // per)))

    def relevance(self, cache: ForwardCache, module: str, layer: int, features: Sequence[int],
                  queries: QuerySpec = None, chunk: int | None = None) -> RelevanceResult:
        """Relevance of every (feature[, query]) target at ``module`` layer ``layer`` down to the input.

        Encoder targets start at the layer output as the activation of channel f on every valid
        token; decoder targets as the activation of channel f of each selected query.

        Features are propagated in chunks of ``chunk`` (default :meth:`max_feature_chunk` under the fixed
        ``config.chunk_budget_bytes``); chunk sizes change float results in the last digits, so an
        explicit ``chunk`` is part of the request. Results are bitwise reproducible for the same request
        (cache, module, layer, features, queries, chunk) and :meth:`numerics` on the same device type and
        library build, whatever the machine's memory or thread count; CPU and CUDA differ in the last
        digits. Running out of memory raises (``torch.OutOfMemoryError`` / ``MemoryError``); the engine
        does not retry with other chunks.
        """
        features, cache, qsel, step, use_maps = self._targets(cache, module, layer, features, queries, chunk)
        parts = [self._relevance_chunk(cache, module, layer, features[i:i + step], qsel, use_maps)
                 for i in range(0, len(features), step)]
        return RelevanceResult.concat(parts)

    def _targets(self, cache: ForwardCache, module: str, layer: int, features: Sequence[int],
                 queries: QuerySpec, chunk: int | None
                 ) -> tuple[list[int], ForwardCache, np.ndarray, int, bool]:
        """A checked call's targets: (features, cache on the device, selected queries [B, R], features per
        chunk, whether to build per-token FFN maps). The maps are for calls with enough targets to pay
        for building them; the choice depends on this call only, so a resumed or rescheduled sweep
        computes identically."""
        features = [int(f) for f in features]
        self.validate(module, layer, features)
        if chunk is not None and int(chunk) < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        cache = cache.to(self.device)
        qsel = self._query_selection(cache, module, queries)
        r = qsel.shape[1]
        step = int(chunk) if chunk else self.max_feature_chunk(cache, module, layer, r)
        use_maps = bool(self.config.ffn_maps and len(features) * r >= self.maps_min_targets)
        return features, cache, qsel, step, use_maps

    def _query_selection(self, cache: ForwardCache, module: str, queries: QuerySpec) -> np.ndarray:
        """[B, R] selected queries per image (``-1`` for encoder targets)."""
        if module == "encoder":
            if queries not in (None, "none"):
                raise ValueError("queries apply to decoder targets only")
            return np.full((cache.batch_size, 1), -1)
        return select_queries(cache, "all" if queries is None else queries)

    @torch.no_grad()
    def token_relevance(self, cache: ForwardCache, module: str, layer: int, features: Sequence[int],
                        queries: QuerySpec = None, chunk: int | None = None) -> tuple[Tensor, np.ndarray]:
        """The full relevance at the transformer input, per token and channel: ``(R [B, N, T, d], queries
        [B, N])`` for the targets of :meth:`relevance` (same order, chunking and numbers: summed over
        ``d`` it is ``relevance(...).token_maps``). ``R = g * tokens`` (tokens = input_proj output, bias
        included; padding zero): the upstream relevance for a backbone backward (:mod:`lrp_ray.pixels`)."""
        features, cache, qsel, step, use_maps = self._targets(cache, module, layer, features, queries, chunk)
        r = qsel.shape[1]
        x0 = cache.tokens.to(self._acc) * (~cache.mask)[..., None].to(self._acc)
        parts = []
        for i in range(0, len(features), step):
            g = self._carrier(cache, module, layer, features[i:i + step], qsel, use_maps)[0]
            parts.append((g.to(self._acc) * x0[:, :, None, :]).transpose(1, 2))   # [B, n, T, d]
        n = len(features) * r
        qs = np.tile(qsel, (1, len(features))) if module == "decoder" else np.full((len(qsel), n), -1)
        return torch.cat(parts, 1), qs

    def _carrier(self, cache: ForwardCache, module: str, layer: int, features: list[int],
                 qsel: np.ndarray, use_maps: bool) -> tuple[Tensor, Ledger, Tensor, Any, Any, Any]:
        """Start ``g`` at the targets and propagate it to the input tokens: (g [B,T,N,d], ledger, target
        relevance, act_sum, act_max, act_mean)."""
        w, acc = self.weights, self._acc
        d = w.hidden_dim
        valid = ~cache.mask
        r = qsel.shape[1]
        if module == "encoder":
            y = cache.encoder[layer].y
            g = EncoderStart(tuple(features), valid, d, self._gdtype)
            yf = y[:, :, features].to(acc)                                   # [B,T,K]
            vmask = valid[:, :, None]
            act_sum = (yf * vmask).sum(1)
            act_max = yf.masked_fill(~vmask, float("-inf")).max(1).values
            act_mean = act_sum / valid.sum(1, keepdim=True).to(acc)
        else:
            y = cache.decoder[layer].y
            g = decoder_start(features, qsel, y.shape[1], d, self._gdtype, self.device)
            q_idx = torch.as_tensor(np.tile(qsel, (1, len(features))), device=self.device)   # [B,N]
            f_idx = torch.as_tensor(np.repeat(features, r), device=self.device)
            act = y.to(acc)[torch.arange(y.shape[0], device=self.device)[:, None], q_idx, f_idx[None, :]]
            act_sum = act_max = act_mean = act
        ledger = Ledger(acc)
        target = ledger.rel(y, g)
        g = self._propagate(cache, w, self.rules, module, layer, g, ledger, use_maps, self.maps_budget)
        return g, ledger, target, act_sum, act_max, act_mean

    @torch.no_grad()
    def _relevance_chunk(self, cache: ForwardCache, module: str, layer: int, features: list[int],
                         qsel: np.ndarray, use_maps: bool = False) -> RelevanceResult:
        acc = self._acc
        valid = ~cache.mask
        r = qsel.shape[1]
        g, ledger, target, act_sum, act_max, act_mean = self._carrier(cache, module, layer, features, qsel,
                                                                      use_maps)
        x0 = cache.tokens.to(acc)
        g = g.to(acc)
        token = token_dot(g, x0).transpose(1, 2)                              # [B,N,T]
        channel = (g * (x0 * valid[:, :, None].to(acc)).unsqueeze(2)).sum(1)  # [B,N,d]
        gh, gw = cache.meta["grid"]
        token = (token * valid[:, None, :].to(acc)).reshape(token.shape[0], token.shape[1], gh, gw)
        zeros = torch.zeros_like(target)
        as_np = lambda v: (v if torch.is_tensor(v) else zeros + v).detach().cpu().numpy()
        n = len(features) * r
        queries = np.tile(qsel, (1, len(features))) if module == "decoder" else np.full((len(qsel), n), -1)
        return RelevanceResult(
            module=module, layer=int(layer), rules=self.rules.name, epsilon=self.rules.epsilon,
            precision=self.config.precision, features=np.repeat(np.asarray(features), r),
            queries=queries, valid_hw=np.asarray(cache.meta["valid_hw"]),
            token_maps=as_np(token).astype(np.float32) if acc == torch.float32 else as_np(token),
            channel_relevance=as_np(channel), profile=np.stack([as_np(p) for p in ledger.profile], -1),
            profile_names=list(ledger.names), target_relevance=as_np(target),
            input_relevance=as_np(token.sum((-1, -2))), bias_relevance=as_np(ledger.bias),
            pos_relevance=as_np(ledger.pos), softmax_relevance=as_np(ledger.softmax),
            act_sum=as_np(act_sum), act_max=as_np(act_max), act_mean=as_np(act_mean),
        )

    def profile_names(self, module: str, layer: int) -> list[str]:
        return profile_names(self.weights, module, layer)

    def detections(self, cache: ForwardCache) -> list[dict[str, np.ndarray]]:
        """Scores, labels, boxes (xyxy, original image coordinates) and query ids per image."""
        from ..models.postprocess import detections

        return detections(cache.pred_logits, cache.pred_boxes, cache.meta["image_sizes"])

    # --------------------------------------------------------------------------------- detections
    def select_detections(self, cache: ForwardCache, selection: DetectionSelection = "top5") -> DetectionSet:
        """The detections ``selection`` picks per image (:func:`.detections.select_detections`)."""
        from .detections import select_detections

        return select_detections(cache, selection)

    def detection_relevance(self, cache: ForwardCache, dets: DetectionSet,
                            layers: dict[str, Sequence[int]] | None = None) -> DetectionRelevance:
        """Relevance from each detection's class logit, with channel relevance at ``layers``
        (:func:`.concepts.detection_relevance`)."""
        from .concepts import detection_relevance

        return detection_relevance(self, cache, dets, layers)

    @torch.no_grad()
    def detection_token_relevance(self, cache: ForwardCache, dets: DetectionSet) -> Tensor:
        """Relevance at the transformer input per token and channel for each detection of ``dets``
        (started at its class logit as :meth:`detection_relevance`): ``R [B, M, T, d] = g * tokens``
        (padding and padding slots zero; summed over ``d`` it is the detections' token maps)."""
        from .detections import logit_start
        from .propagate import propagate_from

        cache = cache.to(self.device)
        acc = self._acc
        head = self.parts.class_embed
        ledger = Ledger(acc)
        g, _ = logit_start(cache, self.rules, dets, head.weight.detach(), head.bias.detach(), self._norm_acc,
                           self._gdtype, ledger)
        use_maps = bool(self.config.ffn_maps and dets.width >= self.maps_min_targets)
        g = propagate_from(cache, self.weights, self.rules, "decoder", len(self.weights.decoder) - 1, g, None,
                           ledger, None, use_maps, self.maps_budget)
        x0 = cache.tokens.to(acc) * (~cache.mask)[..., None].to(acc)
        return (g.to(acc) * x0[:, :, None, :]).transpose(1, 2)

    def conditional_maps(self, cache: ForwardCache, rel: DetectionRelevance, module: str, layer: int,
                         channels: np.ndarray) -> ConditionalMaps:
        """Token maps of detections conditioned on channels at one layer, in one pass
        (:func:`.concepts.conditional_maps`)."""
        from .concepts import conditional_maps

        return conditional_maps(self, cache, rel, module, layer, channels)
