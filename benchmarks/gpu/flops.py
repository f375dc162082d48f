"""Analytic matmul FLOPs of one relevance propagation (cp rules, post-norm DETR), and a cross-check.

Counts every matrix product the engine runs for one ``LrpEngine.relevance`` call with N targets, the way
``torch.utils.flop_counter.FlopCounterMode`` counts them (2 FLOPs per multiply-add of mm/bmm, einsums
included): the large products (FFN, out/value projections, ``P^T``) and the small vector contractions
(bias and LayerNorm-shift relevance, the per-layer profile, the final token/channel maps). An einsum such as
``btnd,d->bn`` sums over tokens before its product, so it counts ``2*B*N*d``, as FlopCounterMode sees it.

Shapes: B images, T encoder tokens (the padded grid, h*w), d hidden, dff FFN width, H heads, N targets per
propagation (features x queries per feature), Q object queries. ``layers`` is the number of layers the
relevance passes: ``layer + 1`` of the module it starts in; a decoder start also passes all
``enc_layers`` encoder layers.

``ffn_maps=True`` counts the encoder FFN through the per-token maps (after they were built; building them
is :func:`ffn_map_build_flops`, once per forward cache and layer).
"""

from __future__ import annotations

from typing import Any


def _encoder_layer(B: int, T: int, d: int, dff: int, N: int, ffn_maps: bool) -> dict[str, int]:
    btn = B * T * N
    terms = {
        "ffn": 2 * btn * d * d if ffn_maps else 2 * 2 * btn * d * dff,
        "attn_proj": 2 * 2 * btn * d * d,         # out_proj and value projection
        "attn_pv": 2 * B * N * d * T * T,         # g_o^T @ P per head, all heads: N*d x T x T
        # bias / shift relevance (ln2, b2, ln1, bo, bv): einsum sums g over tokens first, then B x N x d;
        # the hidden bias b1 likewise (N x dff), or through the maps' bias vectors (BTNd); the profile point
        "vector": 5 * 2 * B * N * d + (2 * btn * d if ffn_maps else 2 * B * N * dff) + 2 * btn * d,
    }
    return terms


def _decoder_layer(B: int, T: int, Q: int, d: int, dff: int, N: int) -> dict[str, int]:
    bqn = B * Q * N
    btn = B * T * N
    return {
        "ffn": 2 * 2 * bqn * d * dff,
        "attn_proj": 2 * 3 * bqn * d * d + 2 * btn * d * d,   # self wo, wv, cross wo; cross wv on memory
        "attn_pv": 2 * B * N * d * Q * T + 2 * B * N * d * Q * Q,
        # bias / shift relevance (ln3, b2, ln2, cross bo/bv, ln1, self bo/bv: B x N x d each after the token
        # sum, b1: B x N x dff); the profile points of the query stream and of the memory
        "vector": 8 * 2 * B * N * d + 2 * B * N * dff + 2 * bqn * d + 2 * btn * d,
    }


def propagation_flops(B: int, T: int, d: int, dff: int, H: int, N: int, layers: int, *,
                      module: str = "encoder", Q: int = 100, enc_layers: int = 6, ffn_maps: bool = False,
                      detail: bool = False) -> Any:
    """Matmul FLOPs of one propagation of N targets from ``module`` through ``layers`` layers.

    Returns an int, or with ``detail`` a dict of terms (``ffn``, ``attn_proj``, ``attn_pv``, ``vector``,
    ``ends``) plus ``total``. H only has to divide d: per-head products add up to the full-width cost.
    """
    if d % H:
        raise ValueError(f"d ({d}) must be divisible by H ({H})")
    if module not in ("encoder", "decoder"):
        raise ValueError(f"module must be encoder or decoder, got {module!r}")
    out = {"ffn": 0, "attn_proj": 0, "attn_pv": 0, "vector": 0}
    if module == "decoder":
        for _ in range(layers):
            for k, v in _decoder_layer(B, T, Q, d, dff, N).items():
                out[k] += v
        n_enc = enc_layers
        start_rows = Q
    else:
        n_enc = layers
        start_rows = T
    for _ in range(n_enc):
        for k, v in _encoder_layer(B, T, d, dff, N, ffn_maps).items():
            out[k] += v
    # target relevance at the start, token map and channel relevance at the encoder input
    out["ends"] = 2 * B * start_rows * N * d + 2 * 2 * B * T * N * d
    out["total"] = sum(out.values())
    return out if detail else out["total"]


def ffn_map_build_flops(B: int, T: int, d: int, dff: int, layers: int) -> int:
    """FLOPs of building the per-token FFN maps of ``layers`` encoder layers (once per cache)."""
    return layers * (2 * B * T * d * dff * d + 2 * B * T * dff * d)


def shapes_of(engine: Any, cache: Any) -> dict[str, int]:
    """B, T, d, dff, H, Q, enc_layers, dec_layers of an engine's forward cache."""
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


def cross_check(engine: Any, cache: Any, layer: int = 1, features: int = 4, queries: str = "top1") -> list[dict]:
    """Analytic count vs ``FlopCounterMode`` for encoder (direct and through FFN maps) and decoder targets.

    ``engine`` should run with ``ffn_maps=False`` for the direct rows; the maps row builds the maps into a
    copy of the cache first (through the engine's own helper) and counts one call that uses them.
    """
    s = shapes_of(engine, cache)
    feats = list(range(features))
    rows = []
    base = dict(B=s["B"], T=s["T"], d=s["d"], dff=s["dff"], H=s["H"], Q=s["Q"], enc_layers=s["enc_layers"])
    cache.derived.clear() if hasattr(cache, "derived") else None
    got = counted_flops(lambda: engine.relevance(cache, "encoder", layer, feats, chunk=features))
    used_maps = _has_maps(cache)
    want = propagation_flops(N=features, layers=layer + 1, module="encoder", ffn_maps=used_maps, **base)
    if used_maps:
        want += ffn_map_build_flops(s["B"], s["T"], s["d"], s["dff"], layer + 1)
    rows.append({"case": f"encoder layer {layer}, N={features}" + (" (maps built)" if used_maps else ""),
                 "analytic": want, "counted": got})
    r = int(queries[3:]) if queries.startswith("top") else s["Q"]
    got = counted_flops(lambda: engine.relevance(cache, "decoder", layer, feats, queries=queries,
                                                 chunk=features))
    used_maps = _has_maps(cache)
    want = propagation_flops(N=features * r, layers=layer + 1, module="decoder", ffn_maps=used_maps, **base)
    rows.append({"case": f"decoder layer {layer}, N={features}x{queries}", "analytic": want, "counted": got})
    # steady state through FFN maps: build them with the engine's helper, then count one call
    try:
        from lrp_ray.lrp.rules import ffn_token_maps

        eps = engine.rules.epsilon
        for i in range(layer + 1):
            cache.derived[("ffn", i, eps)] = ffn_token_maps(cache[f"enc.{i}.u"], engine.weights.encoder[i].ffn,
                                                            eps)
        got = counted_flops(lambda: engine.relevance(cache, "encoder", layer, feats, chunk=features))
        want = propagation_flops(N=features, layers=layer + 1, module="encoder", ffn_maps=True, **base)
        rows.append({"case": f"encoder layer {layer}, N={features}, FFN maps", "analytic": want, "counted": got})
    except Exception as exc:  # the engine's map layout changed: report, do not fail the others
        rows.append({"case": "encoder FFN maps", "error": f"{type(exc).__name__}: {exc}"})
    finally:
        if hasattr(cache, "derived"):
            cache.derived.clear()
    for row in rows:
        if "counted" in row:
            row["rel_diff"] = abs(row["analytic"] - row["counted"]) / max(1, row["counted"])
    return rows


def _has_maps(cache: Any) -> bool:
    return any(isinstance(k, tuple) and k and k[0] == "ffn" for k in getattr(cache, "derived", {}))
