"""Analytic model FLOPs and MFU, MaxText / Levanter style: matmul FLOPs of the forward pass x 3 for
training (forward + backward), divided by step time and the chips' peak.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity). Matched against device_kind.
PEAK_FLOPS = {
    "h200": 989e12, "h100": 989e12, "a100": 312e12, "l4": 121e12, "a10": 125e12,
    "tpu v6": 918e12, "tpu v5p": 459e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v4": 275e12,
}


def text_forward_flops(cfg, seq_len: int) -> float:
    """Matmul FLOPs of one text-tower forward over `seq_len` tokens (embedding lookups are free)."""
    d, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    mlp_in = 1 if cfg.get("model_type") == "xlm_roberta" else 2  # v2: fc1 (d -> I); v1: GeGLU (d -> 2I)
    per_token = 2 * (3 * d * d + d * d + d * mlp_in * inter + inter * d) + 2 * 2 * seq_len * d  # + QK^T and AV
    return float(layers * per_token * seq_len)


def image_forward_flops(cfg) -> float:
    """Matmul FLOPs of one image-tower forward (patch conv, blocks; no patch dropout)."""
    w, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
    grid = cfg.image_size // cfg.patch_size
    tokens = grid * grid + 1
    patch = 2 * grid * grid * (3 * cfg.patch_size**2) * w
    per_token = 2 * (4 * w * w + 2 * w * hidden + hidden * w) + 2 * 2 * tokens * w
    return float(patch + cfg.layers * per_token * tokens)


def train_step_flops(model_cfg, image_text_batch: int, text_batch: int, text_len: int,
                     negatives_per_query: int = 0, caption_len: int | None = None) -> float:
    """Model FLOPs of one training step: 3 x forward of every tower call.

    Image-text pairs: one image and one caption of `caption_len` tokens each (default: text_len). Text pairs:
    query and positive (+ negatives) of `text_len` tokens.
    """
    caption = text_forward_flops(model_cfg.text, text_len if caption_len is None else caption_len)
    forward = image_text_batch * (image_forward_flops(model_cfg.vision) + caption)
    forward += text_batch * (2 + negatives_per_query) * text_forward_flops(model_cfg.text, text_len)
    return 3.0 * forward


def measured_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a dense fp32 n x n matmul on device 0: the practical peak used for MFU where no vendor
    figure applies (CPU)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def peak_flops_per_device(override: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if override:
        return float(override), "config"
    kind = jax.devices()[0].device_kind.lower()
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak, f"table ({kind})"
    return measured_matmul_peak(), f"measured fp32 matmul ({kind})"
