"""jclip-jax: jina-clip (Jina-BERT-v2 text tower + EVA02 image tower) in JAX / Flax NNX."""

__all__ = ["JinaCLIP"]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy (PEP 562): `jclip_jax.data` tools (jclip-prepare and its worker processes) start without jax.
    if name == "JinaCLIP":
        from jclip_jax.models.clip import JinaCLIP

        return JinaCLIP
    raise AttributeError(f"module 'jclip_jax' has no attribute {name!r}")
