"""clip_benchmark (LAION's CLIP Benchmark) for any jclip-jax checkpoint: its datasets, metrics and CLI.

    from jclip_jax.evals.clip_benchmark_adapter import load_jclip
    from clip_benchmark.metrics import zeroshot_retrieval

    model, transform, tokenizer = load_jclip("path/to/checkpoint")   # as clip_benchmark's model registry
    loader = DataLoader(dataset_with(transform), batch_size=64, collate_fn=...)
    zeroshot_retrieval.evaluate(model, loader, tokenizer, device="cpu", amp=False, recall_k_list=[1, 5, 10])

or its command line, with this loader registered as model type "jclip_jax":

    python -m jclip_jax.evals.clip_benchmark_adapter eval --model_type jclip_jax --model PATH \
        --pretrained none --dataset flickr30k --dataset_root ... --task zeroshot_retrieval

`model.encode_text` / `encode_image` take and return torch tensors (token ids (B, L); pixels (B, 3, H, W)
from `transform`) and compute with JAX; `transform` is jina-clip's evaluation transform (preprocess.py).
"""

from __future__ import annotations

import sys

import numpy as np

try:
    import torch
except ImportError as e:  # torch comes with the eval extra (clip_benchmark's dependency) only
    raise ImportError(f"jclip_jax.evals.clip_benchmark_adapter needs clip-benchmark and torch: "
                      f"pip install -e '.[eval]' ({e})") from e

from jclip_jax.evals.checkpoint_encoder import CheckpointEncoder
from jclip_jax.preprocess import eval_transform

MODEL_TYPE = "jclip_jax"


class ClipBenchmarkModel:
    """What clip_benchmark's metrics call: encode_text(ids) and encode_image(pixels), torch in and out."""

    def __init__(self, encoder: CheckpointEncoder):
        self.encoder = encoder

    def eval(self):  # clip_benchmark treats the model as a torch module
        return self

    def to(self, *args, **kwargs):
        return self

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.encoder.token_ids(ids.cpu().numpy()))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        nhwc = pixels.detach().float().cpu().numpy().transpose(0, 2, 3, 1)
        return torch.from_numpy(self.encoder.pixels(nhwc))


class Tokenizer:
    """list[str] -> int64 (B, L) torch ids, right-padded (L: a token bucket, so few compiled shapes)."""

    def __init__(self, encoder: CheckpointEncoder):
        self.encoder = encoder

    def __call__(self, texts) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return torch.from_numpy(self.encoder.tokenizer(texts, self.encoder.max_length).astype(np.int64))


def load_jclip(model_name: str, pretrained: str | None = None, cache_dir: str | None = None, device="cpu",
               batch_size: int = 64, truncate_dim: int | None = None):
    """clip_benchmark's loader signature -> (model, transform, tokenizer). `model_name` is the checkpoint
    (a training workdir or a jina-clip HF directory); `pretrained`, `cache_dir` and `device` are unused."""
    del pretrained, cache_dir, device
    encoder = CheckpointEncoder(model_name, batch_size=batch_size, truncate_dim=truncate_dim)

    def transform(image) -> torch.Tensor:  # PIL -> float32 (3, S, S), as torchvision's ToTensor + Normalize
        return torch.from_numpy(eval_transform(image, encoder.image_size).transpose(2, 0, 1).copy())

    return ClipBenchmarkModel(encoder), transform, Tokenizer(encoder)


def register() -> None:
    """Make "jclip_jax" a model type of clip_benchmark (its load_clip and CLI)."""
    from clip_benchmark import models

    models.TYPE2FUNC[MODEL_TYPE] = load_jclip
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)


if __name__ == "__main__":
    register()
    from clip_benchmark.cli import main

    sys.exit(main())
