"""Export / import of trained NSA weights: `<dir>/meta.json` + `<dir>/nsa.npz` (+ `backbone.npz`
when the dense weights were trained too).

    save_nsa(path, nsa, cfg, config, backbone=params)      # backbone optional
    cfg, nsa, backbone = load_nsa(path, config)            # backbone None if not exported

nsa.npz holds "<layer>/<name>" arrays ({layer: NSA params} of `models.nsa.init_nsa_params`);
backbone.npz the params pytree of `models.llama` flattened as "embed", "layers/<i>/wq", ...
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Optional

import numpy as np

from models.config import ModelConfig
from models.nsa import NSAConfig, check_nsa_params

FORMAT = "kvjax-nsa-v1"


def _flatten(params: dict) -> dict[str, np.ndarray]:
    out = {}
    for k, v in params.items():
        if k == "layers":
            layers = v if isinstance(v, (tuple, list)) else [
                {n: a[i] for n, a in v.items()} for i in range(next(iter(v.values())).shape[0])]
            for i, lp in enumerate(layers):
                out.update({f"layers/{i}/{n}": np.asarray(a) for n, a in lp.items()})
        else:
            out[k] = np.asarray(v)
    return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    params: dict[str, Any] = {}
    layers: dict[int, dict] = {}
    for k, v in flat.items():
        parts = k.split("/")
        if parts[0] == "layers":
            layers.setdefault(int(parts[1]), {})[parts[2]] = v
        else:
            params[k] = v
    params["layers"] = tuple(layers[i] for i in sorted(layers))
    return params


def save_nsa(path, nsa: dict, cfg: NSAConfig, config: ModelConfig, backbone: Optional[dict] = None,
             extra: Optional[dict] = None, dtype: str = "float32") -> pathlib.Path:
    check_nsa_params({int(i): lp for i, lp in nsa.items()}, config, cfg)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / "nsa.npz", **{f"{int(i)}/{n}": np.asarray(a, dtype) for i, lp in nsa.items()
                                  for n, a in lp.items()})
    if backbone is not None:
        np.savez(path / "backbone.npz", **{k: v.astype(dtype) for k, v in _flatten(backbone).items()})
    meta = {"format": FORMAT, "model": config.name, "n_layers": config.n_layers,
            "nsa": dataclasses.asdict(cfg), "backbone": backbone is not None, **(extra or {})}
    (path / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    return path


def _cfg_from(d: dict) -> NSAConfig:
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return NSAConfig(**d)


def load_nsa(path, config: ModelConfig, check_name: bool = True):
    """-> (NSAConfig, {layer: params} as float32 numpy, backbone params or None). Clear errors for
    a missing/foreign directory and for weights of another model."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"NSA weights {path} not found")
    meta_p = path / "meta.json"
    if not meta_p.is_file():
        raise FileNotFoundError(f"{path} is not an NSA export (no meta.json)")
    meta = json.loads(meta_p.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an NSA export (format {meta.get('format')!r}, want {FORMAT!r})")
    if check_name and meta["model"] != config.name:
        raise ValueError(f"{path} was trained for model {meta['model']!r}, not {config.name!r}")
    if meta["n_layers"] != config.n_layers:
        raise ValueError(f"n_layers is {meta['n_layers']} in the NSA weights but {config.n_layers} in the model")
    cfg = _cfg_from(meta["nsa"])
    nsa: dict[int, dict] = {}
    with np.load(path / "nsa.npz") as z:
        for k in z.files:
            i, n = k.split("/")
            nsa.setdefault(int(i), {})[n] = z[k].astype(np.float32)
    check_nsa_params(nsa, config, cfg)
    backbone = None
    if meta.get("backbone"):
        with np.load(path / "backbone.npz") as z:
            backbone = _unflatten({k: z[k].astype(np.float32) for k in z.files})
    return cfg, nsa, backbone
