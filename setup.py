"""jclip-jax: a JAX/Flax reimplementation of the jina-clip training system."""

from setuptools import find_packages, setup

setup(
    name="jclip_jax",
    version="0.1.0",
    description="jina-clip (JinaBERT + EVA02 dual encoder) training in JAX/Flax NNX",
    packages=find_packages(include=["jclip_jax", "jclip_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax",
        "orbax-checkpoint",
        "grain",
        "array-record",
        "ml-collections",
        "numpy",
        "pillow",
        "safetensors",
        "sentencepiece",
        "tokenizers",
        "tqdm",
        "msgpack",
        "tensorboardX",
    ],
    extras_require={
        # torch only for tests and for reading .pt/.bin files; pin it with constraints.txt
        # (an unpinned torch pulls a CUDA build).
        "torch": ["torch", "timm", "open_clip_torch"],
        "tfds": ["tensorflow-datasets", "importlib_resources"],
        "test": [
            "pytest", "pytest-xdist", "ruff", "torch", "timm", "open_clip_torch",
            "tensorflow-datasets", "importlib_resources",
            "transformers>=5.24",  # JinaEmbeddingsV3Model: the v2 text-tower oracle
        ],
    },
    entry_points={
        "console_scripts": [
            "jclip-convert=jclip_jax.convert.cli:main",
            "jclip-prepare=jclip_jax.data.prepare:main",
            "jclip-train=jclip_jax.train:run",
        ],
    },
)
