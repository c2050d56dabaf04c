"""Shared pytest fixtures: the embedded SmolLM2 model and its tokenizer, loaded once per session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """(config, params) of the embedded SmolLM2-135M-Instruct GGUF, dequantized to float32."""
    from models.loading import load_model
    return load_model("smollm2", progress=False)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from models.tokenizer import load_tokenizer
    return load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def smollm2_jax(smollm2):
    """(config, params) of `smollm2` with the weights as jax arrays (converted once per session)."""
    import jax
    import jax.numpy as jnp
    config, params = smollm2
    return config, jax.tree_util.tree_map(jnp.asarray, params)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
    """Drop jax's compiled executables after each test file: an xdist worker runs ~40 files and
    otherwise keeps every executable alive; in the 2-core CI run two workers died inside XLA
    compilation (abort / segfault) late in the run while each file passes alone."""
    yield
    import gc
    import jax
    jax.clear_caches()
    gc.collect()
