"""Load a model to evaluate from a jina-clip HF directory or a training workdir."""

from __future__ import annotations

import os

import ml_collections
from flax import nnx

from jclip_jax import checkpoints
from jclip_jax.models.clip import JinaCLIP
from jclip_jax.tokenizer import TextTokenizer


def load_model(path: str, step: int | None = None, tokenizer: str | None = None) -> JinaCLIP:
    """A JinaCLIP with its tokenizer from `path`: a directory with config.json (JinaCLIP.from_pretrained:
    jina-clip-v1, or what `jclip-convert to-torch` / save_pretrained wrote) or a training workdir (its latest
    checkpoint, or `step`; the tokenizer is the run's config.data.tokenizer_path). `tokenizer` overrides."""
    path = os.fspath(path)
    if os.path.exists(os.path.join(path, "config.json")):
        model = JinaCLIP.from_pretrained(path)
    elif checkpoints.latest_step(path) is not None:
        config = checkpoints.restore_config(path)
        model_cfg = ml_collections.ConfigDict(config.model.to_dict())
        model_cfg.matryoshka_dimensions = tuple(model_cfg.matryoshka_dimensions)
        abstract = nnx.eval_shape(lambda: JinaCLIP(model_cfg, rngs=nnx.Rngs(0)))
        params, _ = checkpoints.restore_params(path, nnx.state(abstract, nnx.Param), step=step)
        graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
        model = nnx.merge(graphdef, params, rest)
        run_tokenizer = config.data.get("tokenizer_path")
        if tokenizer is None and run_tokenizer:
            if not os.path.exists(run_tokenizer):
                raise FileNotFoundError(f"the run's tokenizer {run_tokenizer!r} (config.data.tokenizer_path of "
                                        f"{path!r}) does not exist here; pass the tokenizer file explicitly")
            tokenizer = run_tokenizer
    else:
        raise FileNotFoundError(f"{path!r} is neither a jina-clip directory (config.json) nor a training "
                                "workdir (checkpoints/)")
    if tokenizer is not None:
        model.tokenizer = TextTokenizer(tokenizer)
    if model.tokenizer is None:
        raise ValueError(f"{path!r} has no tokenizer (tokenizer.json / tokenizer.model); pass one")
    return model
