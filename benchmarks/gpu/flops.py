"""Analytic matmul FLOPs of one relevance propagation (cp rules, post-norm DETR), and a cross-check.

Counts every matrix product the engine runs in one ``LrpEngine.relevance`` call with N targets (2 FLOPs
per multiply-add), grouped as

- ``ffn``: the FFN backward (``g @ W2``, ``g @ W1``), or through the per-token (per-query) folded maps
  ``g @ E_t``;
- ``attn_proj``: the out- and value-projection backward (``g @ Wo``, ``g @ Wv``);
- ``attn_pv``: ``g_o^T @ P`` per head (all heads together: ``N*d x Tq x Tk``);
- ``token_dots``: per-token dot products (profile points, the folded maps' bias vectors), batched mat-vecs;
- ``gemv``: relevance absorbed by biases and LayerNorm shifts (``g @ b``, matrix x vector);
- ``ends``: the target relevance and the token maps at the encoder input.

``torch.utils.flop_counter.FlopCounterMode`` counts mm/bmm (and addmm/baddbmm) but not matrix x vector
products (``aten.mv``), so it sees ``total - gemv`` (the key ``counted_equiv``). :func:`cross_check` compares
that with the counter on a small case.

Shapes: B images, T encoder tokens (the padded grid, h*w), d hidden, dff FFN width, H heads, N targets per
propagation (features x queries per feature), Q object queries. ``layers``: the layers the relevance passes
in the module it starts in (``layer + 1``); a decoder start also passes all ``enc_layers`` encoder layers.
``ffn_maps``: the encoder layers go through the per-token maps (after they were built; building them is
:func:`ffn_map_build_flops`, once per forward cache and layer).

Keep in step with ``lrp_ray/lrp/propagate.py``, ``blocks.py`` and ``rules.py``:
``tests/test_benchmarks_smoke.py`` checks the count against FlopCounterMode.
"""

from __future__ import annotations

from typing import Any

KEYS = ("ffn", "attn_proj", "attn_pv", "token_dots", "gemv", "ends")


def _encoder_layer(B: int, T: int, d: int, dff: int, N: int, ffn_maps: bool, one_hot: bool = False
                   ) -> dict[str, int]:
    """``one_hot``: g is still the implicit one-hot start of an encoder target (the top layer): with maps,
    ``g @ E_t`` is a row gather and ``c_t . g`` an index (no products)."""
    btn = B * T * N
    if ffn_maps:  # g @ E_t, the bias vector c_t per token; then the attention part
        return {"ffn": 0 if one_hot else 2 * btn * d * d, "attn_proj": 2 * 2 * btn * d * d,
                "attn_pv": 2 * B * N * d * T * T,
                "token_dots": (1 if one_hot else 2) * 2 * btn * d,  # c_t . g and the profile point
                "gemv": 2 * 2 * btn * d}                            # bo, bv
    return {"ffn": 2 * 2 * btn * d * dff, "attn_proj": 2 * 2 * btn * d * d, "attn_pv": 2 * B * N * d * T * T,
            "token_dots": 2 * btn * d,                           # the profile point
            "gemv": 5 * 2 * btn * d + 2 * btn * dff}             # ln2, b2, ln1, bo, bv; b1


def _decoder_layer(B: int, T: int, Q: int, d: int, dff: int, N: int, ffn_maps: bool = False
                   ) -> dict[str, int]:
    bqn, btn = B * Q * N, B * T * N
    attn = {"attn_proj": 3 * 2 * bqn * d * d + 2 * btn * d * d,  # self wo, wv, cross wo; cross wv (memory)
            "attn_pv": 2 * B * N * d * Q * T + 2 * B * N * d * Q * Q}
    if ffn_maps:  # g @ E_q per query; c_q . g; then cross and self attention
        return {"ffn": 2 * bqn * d * d, **attn,
                "token_dots": 2 * 2 * bqn * d + 2 * btn * d,      # c_q . g, profile: queries and memory
                "gemv": 4 * 2 * bqn * d + 2 * btn * d}            # cross bo, ln1, self bo, self bv; cross bv
    return {"ffn": 2 * 2 * bqn * d * dff, **attn,
            "token_dots": 2 * bqn * d + 2 * btn * d,             # profile: query stream and memory
            # ln3, b2, ln2, cross bo, ln1, self bo, self bv; b1; cross bv (memory)
            "gemv": 7 * 2 * bqn * d + 2 * bqn * dff + 2 * btn * d}


def propagation_flops(B: int, T: int, d: int, dff: int, H: int, N: int, layers: int, *,
                      module: str = "encoder", Q: int = 100, enc_layers: int = 6, ffn_maps: bool = False,
                      detail: bool = False) -> Any:
    """Matmul FLOPs of one propagation of N targets from ``module`` through ``layers`` layers.

    Returns the total (an int), or with ``detail`` a dict of :data:`KEYS` plus ``total`` and
    ``counted_equiv`` (what FlopCounterMode counts). H only has to divide d: the per-head products add up
    to the full-width cost.
    """
    if d % H:
        raise ValueError(f"d ({d}) must be divisible by H ({H})")
    if module not in ("encoder", "decoder"):
        raise ValueError(f"module must be encoder or decoder, got {module!r}")
    out = dict.fromkeys(KEYS, 0)
    if module == "decoder":
        for _ in range(layers):
            for k, v in _decoder_layer(B, T, Q, d, dff, N, ffn_maps).items():
                out[k] += v
        n_enc, start_rows = enc_layers, Q
    else:
        n_enc, start_rows = layers, T
    for i in range(n_enc):
        for k, v in _encoder_layer(B, T, d, dff, N, ffn_maps, one_hot=module == "encoder" and i == 0).items():
            out[k] += v
    # target relevance (an index for encoder starts), token maps
    out["ends"] = (2 * B * start_rows * N * d if module == "decoder" else 0) + 2 * B * T * N * d
    out["total"] = sum(out[k] for k in KEYS)
    out["counted_equiv"] = out["total"] - out["gemv"]
    return out if detail else out["total"]


def ffn_map_build_flops(B: int, T: int, d: int, dff: int, layers: int, active_units: int | None = None,
                        eps_vectors: bool = False) -> int:
    """FLOPs of building the per-token folded maps of ``layers`` encoder layers (once per cache).

    Dense build (accelerators): ``d x dff x d`` per token and layer. Sparse build (CPU): ``d x d`` per
    active FFN unit; ``active_units`` is their count summed over tokens and layers. Plus the bias vectors
    (``(scale * b1) @ W2^T``, ``M_t beta``); ``eps_vectors``: epsilon > 0 makes ``beta`` per token, so
    ``beta @ W1^T`` is a matrix product too.
    """
    core = 2 * B * T * d * dff * d * layers if active_units is None else 2 * d * d * int(active_units)
    return core + layers * (2 + (1 if eps_vectors else 0)) * 2 * B * T * dff * d


def active_ffn_units(cache: Any, layers: int, module: str = "encoder") -> int:
    """Active (ReLU-open) FFN units of ``module`` layers ``0..layers-1`` summed over all tokens (queries)."""
    records = cache.encoder if module == "encoder" else cache.decoder
    return sum(int((records[i].ffn.u > 0).sum()) for i in range(layers))


def shapes_of(engine: Any, cache: Any) -> dict[str, int]:
    """B, T, d, dff, H, Q, enc_layers, dec_layers of a forward cache."""
    m = cache.meta
    gh, gw = m["grid"]
    return {"B": int(cache.batch_size), "T": int(gh * gw), "d": int(m["hidden_dim"]), "dff": int(m["dim_ff"]),
            "H": int(m["nheads"]), "Q": int(m["num_queries"]), "enc_layers": int(m["enc_layers"]),
            "dec_layers": int(m["dec_layers"])}


def counted_flops(fn: Any) -> int:
    """FLOPs that ``FlopCounterMode`` counts while running ``fn()``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def maps_layers(cache: Any) -> int:
    """Encoder layers of this cache with per-token maps built (the engine's derived data)."""
    keys = getattr(cache, "derived", {})
    return sum(1 for k in keys if isinstance(k, tuple) and k and k[0] in ("enc", "ffn"))


def cross_check(engine: Any, cache: Any, layer: int = 1, features: int = 4,
                queries: str = "top1") -> list[dict]:
    """Analytic count (``counted_equiv``) vs ``FlopCounterMode`` for encoder and decoder targets, directly and
    through the per-token maps. ``engine`` must run with ``ffn_maps=False``; the maps row builds them with
    an engine of the default config on the same model first (that call is not counted).
    """
    s = shapes_of(engine, cache)
    feats = list(range(features))
    base = dict(B=s["B"], T=s["T"], d=s["d"], dff=s["dff"], H=s["H"], Q=s["Q"], enc_layers=s["enc_layers"])
    r = int(queries[3:]) if queries.startswith("top") else s["Q"]
    rows = []

    def row(case: str, fn: Any, want: int) -> None:
        try:
            got = counted_flops(fn)
            rows.append({"case": case, "analytic": want, "counted": got,
                         "rel_diff": abs(want - got) / max(1, got)})
        except Exception as exc:  # report, do not lose the other rows
            rows.append({"case": case, "analytic": want, "error": f"{type(exc).__name__}: {exc}"})

    def want(n: int, module: str, ffn_maps: bool = False) -> int:
        return propagation_flops(N=n, layers=layer + 1, module=module, ffn_maps=ffn_maps, detail=True,
                                 **base)["counted_equiv"]

    cache.derived.clear()
    row(f"encoder layer {layer}, N={features}",
        lambda: engine.relevance(cache, "encoder", layer, feats, chunk=features), want(features, "encoder"))
    row(f"decoder layer {layer}, N={features}x{queries}",
        lambda: engine.relevance(cache, "decoder", layer, feats, queries=queries, chunk=features),
        want(features * r, "decoder"))
    try:  # build the maps the way the engine does when many targets use a layer
        from lrp_ray.lrp import EngineConfig, LrpEngine

        cfg = engine.config
        mapper = LrpEngine(engine.parts, EngineConfig(rules=cfg.rules, epsilon=cfg.epsilon,
                                                      precision=cfg.precision, device=str(engine.device)))
        sparse = str(engine.device) == "cpu"  # the build multiplies active units only on CPU
        build = ffn_map_build_flops(s["B"], s["T"], s["d"], s["dff"], layer + 1,
                                    active_ffn_units(cache, layer + 1) if sparse else None,
                                    eps_vectors=cfg.epsilon > 0)
        row(f"encoder layer {layer}, N={s['d']}: builds the per-token maps, then uses them",
            lambda: mapper.relevance(cache, "encoder", layer, list(range(s["d"])), chunk=s["d"]),
            build + want(s["d"], "encoder", True))
        cache.derived.clear()
        dec_build = ffn_map_build_flops(s["B"], s["Q"], s["d"], s["dff"], layer + 1,
                                        active_ffn_units(cache, layer + 1, "decoder") if sparse else None,
                                        eps_vectors=cfg.epsilon > 0)
        enc_build = ffn_map_build_flops(s["B"], s["T"], s["d"], s["dff"], s["enc_layers"],
                                        active_ffn_units(cache, s["enc_layers"]) if sparse else None,
                                        eps_vectors=cfg.epsilon > 0)
        row(f"decoder layer {layer}, N={s['d']}x{queries}: builds the per-query and per-token maps, then "
            "uses them",
            lambda: mapper.relevance(cache, "decoder", layer, list(range(s["d"])), queries=queries,
                                     chunk=s["d"]),
            dec_build + enc_build + want(s["d"] * r, "decoder", True))
        cache.derived.clear()
        mapper.relevance(cache, "encoder", layer, list(range(s["d"])), chunk=s["d"])
        built = maps_layers(cache)
        # the engine's path choice depends on the call only: maps for calls of enough targets
        small_uses_maps = built > 0 and features >= mapper.maps_min_targets
        row(f"encoder layer {layer}, N={features}, after maps were built ({built} layers)",
            lambda: mapper.relevance(cache, "encoder", layer, feats, chunk=features),
            want(features, "encoder", small_uses_maps))
    except Exception as exc:
        rows.append({"case": "per-token maps", "error": f"{type(exc).__name__}: {exc}"})
    finally:
        cache.derived.clear()
    return rows
