"""Sparse-prefill methods: block masks for `pallas_kernels.block_sparse_prefill`.

    from kvjax.sparse_prefill import make_sparse_prefill
    sp = make_sparse_prefill("block_sparse:flexprefill:gamma=0.95")
    kvjax.generate(params, config, prompts, prefill_attention=sp)      # or the string itself
    python -m kvjax generate ... --prefill-attention block_sparse:minference:vertical=100,slash=500

Every method is a frozen dataclass with `block_size` and `select(q, keys, geometry, layer, scale)
-> bool [batch, heads, n_query_blocks, n_key_blocks]` (see `base`); `attend.attend` runs a
prefill chunk through the kernel with it. Decode is unchanged (dense).

    flexprefill   FlexPrefill: query-aware vs vertical-slash per head by JS divergence (gamma, tau)
    minference    MInference vertical-slash (last-64-query estimate) or A-shape, per-head patterns
    a_shape       MInference's A-shape on every head (init=128, local=1024 by default)
    streaming     sink + local blocks on streaming heads (DuoAttention pattern_file), dense elsewhere
    sale          SALE: int8 score estimate vs the sink + local relative-score threshold (tau, or
                  per-head tau_file= from sale.calibrate_taus)
    hyper         HyperAttention: causal halving, sortLSH block groups + sampled blocks (dense below 4096)
"""
from __future__ import annotations

from kvjax.sparse_prefill.flexprefill import FlexPrefill
from kvjax.sparse_prefill.hyper import HyperAttention
from kvjax.sparse_prefill.minference import MInference
from kvjax.sparse_prefill.sale import SALE
from kvjax.sparse_prefill.streaming import StreamingPrefill

METHODS = {
    "flexprefill": FlexPrefill.from_args,
    "minference": MInference.from_args,
    "a_shape": lambda **kw: MInference.from_args(**{"kind": "a_shape", "vertical": 128, "slash": 1024, **kw}),
    "streaming": StreamingPrefill.from_args,
    "sale": SALE.from_args,
    "hyper": HyperAttention.from_args,
}
PREFIX = "block_sparse"


def make_sparse_prefill(spec):
    """A method object from 'block_sparse:<method>[:key=value,...]' (or '<method>[:...]'); a method
    object or None is returned as is. ValueError (one line) for unknown methods / arguments."""
    if spec is None or not isinstance(spec, str):
        return spec
    parts = spec.split(":", 2)
    if parts[0] == PREFIX:
        parts = parts[1:]
    if not parts or not parts[0]:
        raise ValueError(f"prefill attention {spec!r}: expected 'block_sparse:<method>[:k=v,...]' with a method "
                         f"from {sorted(METHODS)}")
    name, args = parts[0], (parts[1] if len(parts) > 1 else "")
    if name not in METHODS:
        raise ValueError(f"unknown sparse-prefill method {name!r}; expected one of {sorted(METHODS)}")
    kw = {}
    for item in filter(None, args.split(",")):
        if "=" not in item:
            raise ValueError(f"prefill attention {spec!r}: argument {item!r} is not key=value")
        k, v = item.split("=", 1)
        kw[k.strip()] = v.strip()
    try:
        return METHODS[name](**kw)
    except TypeError as e:
        raise ValueError(f"prefill attention {spec!r}: {e}") from None


def check_sparse_prefill(method, config) -> None:
    """Clear errors before a model runs: a head pattern of the wrong shape, a block size the kernel
    cannot use."""
    bs = method.block_size
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"sparse-prefill block_size must be a power of two >= 16, got {bs}")
    pattern = getattr(method, "pattern", None)
    if pattern is not None:
        heads = config.n_kv_heads if isinstance(method, StreamingPrefill) else config.n_heads
        if len(pattern) != config.n_layers or any(len(row) != heads for row in pattern):
            raise ValueError(f"{type(method).__name__} pattern must be [layers={config.n_layers}][heads={heads}], "
                             f"got {len(pattern)} layers x {sorted({len(r) for r in pattern})} heads")
    taus = getattr(method, "taus", None)
    if taus is not None and (len(taus) != config.n_layers or any(len(row) != config.n_heads for row in taus)):
        raise ValueError(f"SALE taus must be [layers={config.n_layers}][q_heads={config.n_heads}], "
                         f"got {len(taus)} layers x {sorted({len(r) for r in taus})} heads")


__all__ = ["FlexPrefill", "HyperAttention", "MInference", "SALE", "StreamingPrefill", "make_sparse_prefill", "check_sparse_prefill", "METHODS"]
