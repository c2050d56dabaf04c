"""Pallas decode-attention kernels with backend dispatch.

Every kernel has three implementations sharing one signature: the Pallas-Triton GPU kernel
(`pallas_kernels.gpu.*`), the Pallas-Mosaic TPU kernel (`pallas_kernels.tpu.*`; validated in TPU
interpret mode and lowered to Mosaic on CPU, not yet run on a TPU) and the pure-jnp reference
(`pallas_kernels.reference`, the XLA path and the test oracle).

    from pallas_kernels import dense_decode
    out = dense_decode(q, k, v, lengths)                      # GPU kernel on gpu, TPU kernel on tpu, XLA on cpu
    out = dense_decode(q, k, v, lengths, impl="gpu", interpret=True)   # GPU kernel, interpreted (CPU tests)

`impl`: None (by backend), "gpu", "tpu" or "reference". `interpret=True` runs the chosen Pallas
kernel in interpret mode (with impl=None it picks the GPU kernel). Tuning keywords (block_k,
num_splits, num_warps, ...) are forwarded to the kernel and ignored by the reference.

Kernels: dense_decode, kivi_decode, sparse_decode, qjl_scores (decode) and flash_prefill
(causal chunked prefill over the cache), block_sparse_prefill (the same over listed key
blocks: the sparse-prefill methods of `kvjax.sparse_prefill`); see `reference` for the contracts.
"""
from __future__ import annotations

import inspect

import jax

from pallas_kernels import reference

KERNELS = ("dense_decode", "kivi_decode", "sparse_decode", "qjl_scores", "flash_prefill",
           "block_sparse_prefill")
IMPLS = ("gpu", "tpu", "reference")


def _gpu(name):
    from pallas_kernels import gpu  # noqa: F401  (imported lazily: Triton lowering is GPU-only)
    import importlib
    return getattr(importlib.import_module(f"pallas_kernels.gpu.{name}"), name)


def _tpu(name):
    import importlib
    try:
        mod = importlib.import_module(f"pallas_kernels.tpu.{name}")
    except ModuleNotFoundError:
        return None
    return getattr(mod, name)


def resolve(name: str, impl: str | None = None, interpret: bool = False):
    """The function implementing kernel `name` for `impl` (None: by jax.default_backend())."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; expected one of {KERNELS}")
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
    if impl is None:
        backend = jax.default_backend()
        impl = "gpu" if (backend in ("gpu", "cuda", "rocm") or interpret) else \
               "tpu" if backend == "tpu" else "reference"
        if impl == "tpu" and _tpu(name) is None:
            impl = "reference"
    if impl == "reference":
        return getattr(reference, name), False
    fn = _gpu(name) if impl == "gpu" else _tpu(name)
    if fn is None:
        raise ValueError(f"no {impl} kernel for {name}")
    return fn, True


def _dispatch(name):
    # the reference gets exactly the keywords it takes (tuning keywords are the kernels' own)
    keep = frozenset(inspect.signature(getattr(reference, name)).parameters)

    def call(*args, impl: str | None = None, interpret: bool = False, **kwargs):
        fn, is_kernel = resolve(name, impl, interpret)
        if is_kernel:
            return fn(*args, interpret=interpret, **kwargs)
        return fn(*args, **{k: v for k, v in kwargs.items() if k in keep})
    call.__name__ = name
    call.__doc__ = getattr(reference, name).__doc__
    return call


dense_decode = _dispatch("dense_decode")
kivi_decode = _dispatch("kivi_decode")
sparse_decode = _dispatch("sparse_decode")
qjl_scores = _dispatch("qjl_scores")
flash_prefill = _dispatch("flash_prefill")
block_sparse_prefill = _dispatch("block_sparse_prefill")
