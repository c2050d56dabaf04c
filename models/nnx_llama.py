"""The Llama family as Flax NNX modules over the one functional core, `models.llama.forward`.

`Llama` holds the weights as `nnx.Param`s under the names and shapes of the params pytree
documented in `models.config.ModelConfig` (`embed`, `final_norm`, optional `lm_head`, and
`layers`: a list of `DecoderLayer`, each with `wq wk wv wo w_gate w_up w_down attn_norm
mlp_norm` [+ `bq bk bv`] [+ `q_norm k_norm`]). Its `__call__` gathers them into that pytree
(`params_of`, no copies) and runs `models.llama.forward`: there is one implementation of the
math, and the module adds nothing to it but parameter ownership and dtypes.

Dtypes:
- `param_dtype`: what the Params are stored in (float32 by default; `from_params` keeps the
  dtype of the arrays it is given).
- `dtype`: the compute dtype; None computes in the stored dtype. With `dtype=jnp.bfloat16` and
  float32 Params (mixed precision: float32 master weights, e.g. for training) every call casts the
  weights to bfloat16 first. For inference, cast once instead: `model = cast(model, "bfloat16")`
  (or `load_model(name, dtype="bfloat16")`), and give the cache the same dtype
  (`init_cache(..., dtype=jnp.bfloat16)`). `forward` computes in the dtype of the parameters
  (RMSNorm statistics and logits in float32).

    from flax import nnx
    import jax, jax.numpy as jnp
    from kvjax.cache import init_cache
    from models.nnx_llama import Llama, from_params, params_of, cast

    model = Llama(config, rngs=nnx.Rngs(0), param_dtype=jnp.float32)     # random init
    model = from_params(config, params)                                   # or: loaded weights
    cache = init_cache(config.n_layers, 1, config.n_kv_heads, 256, config.head_dim)
    logits, cache, outs = model(tokens, positions, cache)                 # eager

    # The pure function for jax.jit: split the module into a static graph and a state pytree,
    # and merge them back inside the traced function (the config and the forward options are
    # static; the state, tokens, positions and cache are traced).
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tokens, positions, cache):
        return nnx.merge(graphdef, state)(tokens, positions, cache)

    logits, cache, outs = step(state, tokens, positions, cache)

    # The plain params pytree, for the engine (`kvjax.generate.generate`, `kvjax.eval`):
    params = params_of(model)            # the module's own arrays, not copies

The engine (`kvjax.generate`) keeps taking the params pytree; the module is the owner of the
weights (initialization, dtype, later sharding annotations), `params_of` the bridge.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.llama import forward, layer_params
from models.loading import parse_dtype

Params = dict[str, Any]
DTypeLike = Any

_List = getattr(nnx, "List", list)   # nnx.List where this flax has it; flax 0.12 still accepts a list


def layer_shapes(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, init) of one decoder layer's weights; init is "normal" or "ones"."""
    d, f, hd = config.d_model, config.ffn_dim, config.head_dim
    qd, kd = config.n_heads * hd, config.n_kv_heads * hd
    shapes = {"wq": ((d, qd), "normal"), "wk": ((d, kd), "normal"), "wv": ((d, kd), "normal"),
              "wo": ((qd, d), "normal"), "w_gate": ((d, f), "normal"), "w_up": ((d, f), "normal"),
              "w_down": ((f, d), "normal")}
    if config.qkv_bias:
        shapes.update(bq=((qd,), "normal"), bk=((kd,), "normal"), bv=((kd,), "normal"))
    shapes.update(attn_norm=((d,), "ones"), mlp_norm=((d,), "ones"))
    if config.qk_norm:
        shapes.update(q_norm=((hd,), "ones"), k_norm=((hd,), "ones"))
    if config.attn_gate:
        from models.gated_attention import gate_shapes
        shapes.update({n: (s, "normal") for n, s in gate_shapes(config).items()})
    return shapes


# Logical axis names of every weight (the Params' `out_sharding` metadata); `kvjax.sharding` maps
# them to mesh axes (q/kv heads, MLP hidden, vocabulary -> "model"; the rest replicated).
LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"), "lm_head": ("embed", "vocab"), "final_norm": ("embed",),
    "wq": ("embed", "q_heads"), "wk": ("embed", "kv_heads"), "wv": ("embed", "kv_heads"),
    "wo": ("q_heads", "embed"), "bq": ("q_heads",), "bk": ("kv_heads",), "bv": ("kv_heads",),
    "w_gate": ("embed", "mlp"), "w_up": ("embed", "mlp"), "w_down": ("mlp", "embed"),
    "attn_norm": ("embed",), "mlp_norm": ("embed",), "q_norm": ("head_dim",), "k_norm": ("head_dim",),
    "w_attn_gate": ("embed", "q_heads"), "b_attn_gate": ("q_heads",),
}


def _init(rngs: nnx.Rngs, shape, kind: str, dtype, scale: float, name: str = "") -> nnx.Param:
    """As `models.llama.init_params`: normal * scale drawn in float32 then cast; norms at 1.
    The Param carries its logical axes (`LOGICAL_AXES[name]`, placed only by `kvjax.sharding`)."""
    meta = dict(out_sharding=LOGICAL_AXES[name], eager_sharding=False) if name else {}
    if kind == "ones":
        return nnx.Param(jnp.ones(shape, dtype), **meta)
    return nnx.Param((scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype), **meta)


class DecoderLayer(nnx.Module):
    """One pre-norm block's weights (the math is `models.llama.decoder_layer`)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, param_dtype: DTypeLike = jnp.float32,
                 scale: float = 0.02):
        dtype = parse_dtype(param_dtype)
        self.names = tuple(layer_shapes(config))
        for name, (shape, kind) in layer_shapes(config).items():
            setattr(self, name, _init(rngs, shape, kind, dtype, scale, name))

    def params(self) -> Params:
        """This layer's weights as the dict `models.llama.decoder_layer` takes (the Params' own arrays)."""
        return {name: getattr(self, name).get_value() for name in self.names}


class Llama(nnx.Module):
    """A Llama-family decoder (SmolLM2, Llama 3, Mistral, Qwen2/3) whose call is `models.llama.forward`.

    `Llama(config, rngs=nnx.Rngs(0), param_dtype=jnp.float32, dtype=None)`: random init as
    `models.llama.init_params` (normal * 0.02, norms at 1). `dtype` is the compute dtype (None:
    the stored dtype; see the module docstring)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, param_dtype: DTypeLike = jnp.float32,
                 dtype: Optional[DTypeLike] = None, scale: float = 0.02):
        pdt = parse_dtype(param_dtype)
        self.config = config
        self.dtype = None if dtype is None else parse_dtype(dtype)
        self.embed = _init(rngs, (config.vocab_size, config.d_model), "normal", pdt, scale, "embed")
        self.layers = _List([DecoderLayer(config, rngs=rngs, param_dtype=pdt, scale=scale)
                             for _ in range(config.n_layers)])
        self.final_norm = _init(rngs, (config.d_model,), "ones", pdt, scale, "final_norm")
        self.lm_head = (None if config.tie_embeddings else
                        _init(rngs, (config.d_model, config.vocab_size), "normal", pdt, scale, "lm_head"))

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache, **forward_kwargs):
        """`models.llama.forward(params_of(self), tokens, positions, cache, self.config, **forward_kwargs)`
        (weights cast to `self.dtype` first when it is set) -> (logits, cache, outputs)."""
        params = params_of(self)
        if self.dtype is not None:
            params = cast(params, self.dtype)
        return forward(params, tokens, positions, cache, self.config, **forward_kwargs)


def params_of(model: Llama) -> Params:
    """The params pytree of `models.llama.forward` (`layers` as a tuple of per-layer dicts) made of
    the module's own arrays (shared, not copied)."""
    params = {"embed": model.embed.get_value(), "final_norm": model.final_norm.get_value(),
              "layers": tuple(layer.params() for layer in model.layers)}
    if model.lm_head is not None:
        params["lm_head"] = model.lm_head.get_value()
    return params


def _fill(param: nnx.Param, value, where: str) -> None:
    want = param.get_value().shape
    if tuple(np.shape(value)) != tuple(want):
        raise ValueError(f"from_params: {where} has shape {tuple(np.shape(value))}, the config needs {tuple(want)}")
    param.set_value(jnp.asarray(value))


def from_params(config: ModelConfig, params: Params, *, dtype: Optional[DTypeLike] = None) -> Llama:
    """A `Llama` holding `params` (either layer form: a tuple of per-layer dicts, used as is, or one
    dict stacked on axis 0, sliced per layer). The module is built abstractly (`nnx.eval_shape`: no
    random init is computed) and filled; jax arrays are taken as they are (not copied), numpy
    arrays are moved to the device. The Params keep the arrays' dtype; `dtype` is the compute dtype."""
    missing = [k for k in ("embed", "final_norm", "layers") + (() if config.tie_embeddings else ("lm_head",))
               if k not in params]
    if missing:
        raise ValueError(f"from_params: params lack {missing} (config {config.name})")
    pdt = np.dtype(params["embed"].dtype)
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), param_dtype=pdt, dtype=dtype))
    layers = layer_params(params)
    if len(layers) != config.n_layers:
        raise ValueError(f"from_params: {len(layers)} layers, config {config.name} has {config.n_layers}")
    _fill(model.embed, params["embed"], "embed")
    _fill(model.final_norm, params["final_norm"], "final_norm")
    if model.lm_head is not None:
        _fill(model.lm_head, params["lm_head"], "lm_head")
    for i, (layer, lp) in enumerate(zip(model.layers, layers)):
        if set(lp) != set(layer.names):
            raise ValueError(f"from_params: layer {i} has weights {sorted(lp)}, config {config.name} "
                             f"needs {sorted(layer.names)}")
        for name in layer.names:
            _fill(getattr(layer, name), lp[name], f"layers[{i}].{name}")
    return model


def cast(params_or_model: Union[Params, Llama], dtype: DTypeLike) -> Union[Params, Llama]:
    """The same parameters with every floating-point array in `dtype` ("bfloat16", "float32" or a
    jnp dtype); arrays already in `dtype` are kept, not copied. A params pytree gives a params
    pytree (numpy stays numpy), a `Llama` a new `Llama` (the argument is left unchanged)."""
    dt = parse_dtype(dtype)

    def one(x):
        return x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dt else x

    if isinstance(params_or_model, nnx.Module):
        graphdef, state = nnx.split(params_or_model)
        return nnx.merge(graphdef, jax.tree_util.tree_map(one, state))
    return jax.tree_util.tree_map(one, params_or_model)
