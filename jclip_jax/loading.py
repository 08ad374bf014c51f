"""Open a jina-clip model from wherever it lives: the one loader of training init, evaluation, export and
fine-tuning configs.

    model = load_model("jina-clip-v1/")                # a Hugging Face directory (config.json + weights)
    model = load_model("workdirs/stage1", step=1000)   # a jclip-train workdir's checkpoint
    model_cfg, tokenizer_path = model_config_and_tokenizer(source)  # the same sources, no weights read
    state_dict = read_weights("eva02.safetensors")     # a tower's weights: .safetensors, or .bin/.pt/.pth

A source is a directory with config.json (JinaCLIP.from_pretrained: jina-clip-v1, or what `jclip-convert
to-torch` / save_pretrained wrote) or a training workdir (its latest checkpoint, or `step`; its tokenizer is
the run's config.data.tokenizer_path). Anything else fails in one line naming the path.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np
from flax import nnx

from jclip_jax.convert import hf_layout
from jclip_jax.models.clip import JinaCLIP
from jclip_jax.tokenizer import TextTokenizer
from jclip_jax.training import checkpoints


def is_hf_directory(source) -> bool:
    return os.path.exists(os.path.join(os.fspath(source), hf_layout.CONFIG_FILE))


def model_config_and_tokenizer(source) -> tuple[ml_collections.ConfigDict, str]:
    """(model config, tokenizer path or "") of a jina-clip HF directory or a jclip-train workdir."""
    source = os.fspath(source)
    if is_hf_directory(source):
        tokenizer = next((os.path.join(source, n) for n in hf_layout.TOKENIZER_FILES
                          if os.path.exists(os.path.join(source, n))), "")
        return hf_layout.read_config(source), tokenizer
    if checkpoints.latest_step(source) is None:
        raise FileNotFoundError(f"{source!r} is neither a jina-clip directory (config.json) nor a training "
                                "workdir (checkpoints/)")
    saved = checkpoints.restore_config(source)
    model_cfg = ml_collections.ConfigDict(saved.model.to_dict())
    model_cfg.matryoshka_dimensions = tuple(model_cfg.get("matryoshka_dimensions", ()))  # JSON made it a list
    return model_cfg, saved.data.get("tokenizer_path", "") or ""


def load_model(source, step: int | None = None, tokenizer: str | None = None,
               require_tokenizer: bool = True) -> JinaCLIP:
    """A JinaCLIP with its tokenizer from `source` (see the module docstring). `tokenizer` overrides the
    source's; require_tokenizer=False returns a model without one where the source has none."""
    source = os.fspath(source)
    if is_hf_directory(source):
        model = JinaCLIP.from_pretrained(source)
    else:
        model_cfg, run_tokenizer = model_config_and_tokenizer(source)
        abstract = hf_layout.abstract_model(JinaCLIP, model_cfg)
        params, _ = checkpoints.restore_params(source, nnx.state(abstract, nnx.Param), step=step)
        graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
        model = nnx.merge(graphdef, params, rest)
        if tokenizer is None and run_tokenizer:
            if os.path.exists(run_tokenizer):
                tokenizer = run_tokenizer
            elif require_tokenizer:
                raise FileNotFoundError(f"the run's tokenizer {run_tokenizer!r} (config.data.tokenizer_path of "
                                        f"{source!r}) does not exist here; pass the tokenizer file explicitly")
    if tokenizer is not None:
        model.tokenizer = TextTokenizer(tokenizer)
    if model.tokenizer is None and require_tokenizer:
        raise ValueError(f"{source!r} has no tokenizer (tokenizer.json / tokenizer.model); pass one")
    return model


def read_weights(path: str) -> dict[str, np.ndarray]:
    """A state dict from .safetensors (no torch needed) or a torch pickle (.bin/.pt/.pth)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        return hf_layout.read_state_dict(path)
    if path.endswith((".bin", ".pt", ".pth")):
        try:
            import torch
        except ImportError:
            raise ValueError(f"reading {path} needs torch (pip install torch==2.13.0), or convert it to "
                             ".safetensors first") from None
        sd = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "module"):  # common wrappers of training checkpoints
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
        return {k: v.float().numpy() for k, v in sd.items() if hasattr(v, "numpy")}
    raise ValueError(f"unknown weights format {path!r} (.safetensors, .bin, .pt, .pth)")
