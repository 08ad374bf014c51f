"""jclip-jax: jina-clip (Jina-BERT-v2 text tower + EVA02 image tower) in JAX / Flax NNX."""

from jclip_jax.models.clip import JinaCLIP

__all__ = ["JinaCLIP"]
__version__ = "0.1.0"
