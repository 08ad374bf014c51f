"""jclip-jax: a JAX/Flax reimplementation of the jina-clip training system."""

from setuptools import find_packages, setup

setup(
    name="jclip_jax",
    version="0.1.0",
    description="jina-clip (JinaBERT + EVA02 dual encoder) training in JAX/Flax NNX",
    packages=find_packages(include=["jclip_jax", "jclip_jax.*"]),
    package_data={"jclip_jax.evals": ["default_templates.txt"]},
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
        # jclip-eval's harness adapters (mteb, clip_benchmark) and the Matryoshka plot; CI tests run them.
        "eval": ["mteb>=2.26,<2.27", "clip-benchmark==1.6.2", "matplotlib"],
        # libtpu: what TPU hosts install, and what jclip-compile needs to compile for a TPU topology on any host.
        "tpu": ["jax[tpu]"],
        "test": [
            "pytest", "pytest-xdist", "ruff", "torch", "timm", "open_clip_torch",
            "tensorflow-datasets", "importlib_resources",
            "mteb>=2.26,<2.27", "clip-benchmark==1.6.2", "matplotlib",  # = the eval extra
            "nbclient", "nbformat", "ipykernel",  # notebooks executed in CI
            "jax[tpu]",  # = the tpu extra: tests/test_compile.py
            "transformers>=5.24",  # JinaEmbeddingsV3Model: the v2 text-tower oracle
        ],
    },
    entry_points={
        "console_scripts": [
            "jclip-convert=jclip_jax.convert.cli:main",
            "jclip-prepare=jclip_jax.data.prepare:main",
            "jclip-train=jclip_jax.training.cli:run",
            "jclip-eval=jclip_jax.evals.cli:main",
            "jclip-compile=jclip_jax.compile.cli:run",
        ],
    },
)
