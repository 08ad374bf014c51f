"""JinaCLIP: a Jina-BERT (v1) or Jina-XLM-RoBERTa (v2) text tower, the EVA02 image tower, optional
projections and `logit_scale`.

    model = JinaCLIP(configs.tiny(), rngs=nnx.Rngs(0))          # from scratch
    model = JinaCLIP.from_pretrained("path/to/hf_dir")           # config.json + model.safetensors
    model.encode_text(["a photo of a cat"])                      # L2-normalised numpy, model-card API
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from jclip_jax.models.eva02 import EvaVisionTower
from jclip_jax.models.jina_bert import JinaBertTextTower
from jclip_jax.models.layers import dtype_of, l2_normalize, logical, trunc_normal
from jclip_jax.models.xlm_roberta import XLMRobertaTextTower

TEXT_TOWERS = {"jina_bert": JinaBertTextTower, "xlm_roberta": XLMRobertaTextTower}


def text_tower_type(text_cfg) -> str:
    """'jina_bert' (v1; its config has no model_type) or 'xlm_roberta' (v2)."""
    kind = text_cfg.get("model_type", "jina_bert")
    if kind not in TEXT_TOWERS:
        raise ValueError(f"text.model_type={kind!r}; known: {sorted(TEXT_TOWERS)}")
    return kind


class JinaCLIP(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs, tokenizer=None):
        self.cfg = cfg
        remat = cfg.get("remat_policy", "nothing") if cfg.remat else False  # a policy name, or off
        opts = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, scan_layers=cfg.scan_layers, remat=remat,
                    attention=cfg.get("attention", "xla"))
        self.text_model = TEXT_TOWERS[text_tower_type(cfg.text)](cfg.text, rngs=rngs, **opts)
        self.vision_model = EvaVisionTower(cfg.vision, rngs=rngs, **opts)
        pdt = dtype_of(cfg.param_dtype)
        if cfg.add_projections:
            # [U] jina-clip's optional projections are bias-free linear maps; v1 and v2 have none.
            proj = dict(use_bias=False, dtype=dtype_of(cfg.dtype), param_dtype=pdt,
                        kernel_init=logical(trunc_normal(), "embed", None), rngs=rngs)
            self.text_projection = nnx.Linear(cfg.text.hidden_size, cfg.projection_dim, **proj)
            self.visual_projection = nnx.Linear(cfg.vision.width, cfg.projection_dim, **proj)
        else:
            self.text_projection = self.visual_projection = None
        # log(1/tau); exp() is applied by the loss, which also clamps it to <= ln(100).
        self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init_value, pdt), out_sharding=())
        self.tokenizer = tokenizer  # a jclip_jax.tokenizer.TextTokenizer, needed by encode_text only

    @property
    def embed_dim(self) -> int:
        return self.cfg.projection_dim if self.cfg.add_projections else self.cfg.text.hidden_size

    def text_features(self, ids: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """ids (B, L) int32, right-padded with the pad id -> (B, embed_dim) float32, not normalised.

        rng=None is deterministic (evaluation); a PRNG key turns dropout on (training).
        """
        x = self.text_model(ids, rng)
        return x if self.text_projection is None else self.text_projection(x).astype(jnp.float32)

    def image_features(self, pixels: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """pixels (B, H, W, 3) float, CLIP-normalised -> (B, embed_dim) float32, not normalised.

        rng=None is deterministic; a PRNG key turns patch dropout on.
        """
        x = self.vision_model(pixels, rng)
        return x if self.visual_projection is None else self.visual_projection(x).astype(jnp.float32)

    def __call__(self, ids, pixels):
        """(B, L) ids and (B, H, W, 3) pixels -> (text, image) L2-normalised (B, embed_dim) each."""
        return l2_normalize(self.text_features(ids)), l2_normalize(self.image_features(pixels))

    # --- checkpoint interchange (Hugging Face layout) and the model-card API -------------------------

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **overrides) -> JinaCLIP:
        """Load config.json + model.safetensors (+ tokenizer.json) written by jina-clip or save_pretrained.

        `overrides` set execution options (dtype, remat, scan_layers) on the loaded config.
        """
        from jclip_jax.convert import hf_layout

        return hf_layout.load_pretrained(cls, directory, **overrides)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        from jclip_jax.convert import hf_layout

        hf_layout.save_pretrained(self, directory)

    def encode_text(self, texts, batch_size: int = 32, truncate_dim: int | None = None, max_length=None,
                    task: str | None = None):
        """task (v2): prepend that task's instruction from the config, e.g. task="retrieval.query"."""
        from jclip_jax import inference

        return inference.encode_text(self, texts, batch_size=batch_size, truncate_dim=truncate_dim,
                                  max_length=max_length, task=task)

    def encode_image(self, images, batch_size: int = 32, truncate_dim: int | None = None):
        from jclip_jax import inference

        return inference.encode_image(self, images, batch_size=batch_size, truncate_dim=truncate_dim)
