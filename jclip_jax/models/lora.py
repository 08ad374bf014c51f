"""LoRA as jina-embeddings-v3 / jina-clip-v2 have it (spec §5.1, §5.4): low-rank deltas on every Linear and
Embedding of the text tower, one (A, B) pair per adaptation (task), scaled by alpha / rank.

    Linear    W_eff = W + scaling * A_t @ B_t     kernel (in, *out), lora_a (n, in, r), lora_b (n, r, *out)
    Embedding E_eff = E + scaling * A_t @ B_t     table (num, dim),  lora_a (n, num, r), lora_b (n, r, dim)

(torch keeps Linear weights as [out, in], so its `lora_A` is [n, r, in] and `lora_B` [n, out, r]: the
transposes of ours; its Embedding `lora_A` [n, num, r] / `lora_B` [n, r, dim] are ours as they are.)

The forward keeps the delta factored, `x W + scaling * (x A_t) B_t`, so a LoRA-only step never builds a
full-size delta; `merged_kernel` / `merged_embedding` give the merged weights (export, parity, merging).
The task index t is static: the config's `default_lora_task` (jina-clip applies it on every forward).

Training modes (train config `text_lora`, applied through `config.optim.frozen`, see `frozen_patterns`):
  'all'        every parameter trains, the LoRA factors included (the default)
  'lora_only'  the text tower's base weights are frozen (Jina's `lora_main_params_trainable: false`); only
               `lora_a`/`lora_b` (and the image tower, logit_scale) train; frozen weights hold no Adam moments
  'base_only'  the LoRA factors are held fixed; everything else trains (full fine-tuning, LoRA fixed)
  'merged'     at the start of a run the LoRA deltas are folded into the base weights (`merge_lora`) and the
               factors then held fixed (lora_b = 0): full fine-tuning of the merged tower
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jclip_jax.models.layers import ZEROS, embedding_lookup, logical, trunc_normal

TEXT_LORA_MODES = ("all", "lora_only", "base_only", "merged")


def kaiming_uniform_fan_in():
    """torch's nn.Linear default init, which jina's LoRA uses for lora_A [n, r, in]: U(-b, b), b = 1/sqrt(in)
    (kaiming_uniform with a = sqrt(5)). Ours is (n, in, r): fan-in axis -2, adaptations a batch axis."""
    return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-2, out_axis=-1,
                                             batch_axis=(0,))


class LoRALinear(nnx.Module):
    """x (..., in) -> (..., *out): x kernel + bias + scaling * (x lora_a[t]) lora_b[t].

    kernel (in, *out) with logical axes `axes` (len 1 + len(out)); lora_a (n, in, r); lora_b (n, r, *out).
    n = 0 adaptations: a plain linear layer with no LoRA params.
    """

    def __init__(self, in_features: int, out_features: tuple[int, ...], axes: tuple, *, adaptations: int,
                 rank: int, alpha: float, task: int, dtype, param_dtype, rngs: nnx.Rngs, use_bias: bool = True):
        self.out_features, self.dtype = tuple(out_features), dtype
        self.kernel = nnx.Param(logical(trunc_normal(), *axes)(rngs.params(), (in_features, *out_features),
                                                               param_dtype))
        self.bias = (nnx.Param(logical(ZEROS, *axes[1:])(rngs.params(), self.out_features, param_dtype))
                     if use_bias else None)
        self.task, self.scaling = task, (alpha / rank if adaptations else 0.0)
        if adaptations:
            self.lora_a = nnx.Param(logical(kaiming_uniform_fan_in(), None, axes[0], None)(
                rngs.params(), (adaptations, in_features, rank), param_dtype))
            self.lora_b = nnx.Param(logical(ZEROS, None, None, *axes[1:])(
                rngs.params(), (adaptations, rank, *out_features), param_dtype))
        else:
            self.lora_a = self.lora_b = None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype).reshape(x.shape[-1], -1)
        y = x @ kernel
        if self.lora_a is not None:
            a = self.lora_a[...][self.task].astype(self.dtype)  # (in, r)
            b = self.lora_b[...][self.task].astype(self.dtype).reshape(a.shape[1], -1)  # (r, out)
            y = y + ((x @ a) @ b) * jnp.asarray(self.scaling, self.dtype)
        y = y.reshape(*x.shape[:-1], *self.out_features)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)

    def merged_kernel(self) -> jax.Array:
        """kernel + scaling * lora_a[t] @ lora_b[t], shape (..., in, *out) (... = stacked layers), param dtype."""
        if self.lora_a is None:
            return self.kernel[...]
        return merge_factors(self.kernel[...], self.lora_a[...], self.lora_b[...], self.scaling, self.task)


class LoRAEmbed(nnx.Module):
    """ids (...) -> (..., dim): embedding[ids] + scaling * lora_a[t][ids] @ lora_b[t]."""

    def __init__(self, num_embeddings: int, dim: int, axes: tuple, *, adaptations: int, rank: int, alpha: float,
                 task: int, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype, self.axes = dtype, tuple(axes)
        self.embedding = nnx.Param(logical(trunc_normal(), *axes)(rngs.params(), (num_embeddings, dim), param_dtype))
        self.task, self.scaling = task, (alpha / rank if adaptations else 0.0)
        if adaptations:  # jina's Embedding LoRA: A zeros, B normal (the reverse of Linear's)
            self.lora_a = nnx.Param(logical(ZEROS, None, axes[0], None)(
                rngs.params(), (adaptations, num_embeddings, rank), param_dtype))
            self.lora_b = nnx.Param(logical(nnx.initializers.normal(1.0), None, None, axes[1])(
                rngs.params(), (adaptations, rank, dim), param_dtype))
        else:
            self.lora_a = self.lora_b = None

    def __call__(self, ids: jax.Array) -> jax.Array:
        out = embedding_lookup(self.embedding[...], ids, self.dtype, self.axes)
        if self.lora_a is not None:
            a = jnp.take(self.lora_a[...][self.task], ids, axis=0).astype(self.dtype)  # (..., r)
            out = out + (a @ self.lora_b[...][self.task].astype(self.dtype)) * jnp.asarray(self.scaling, self.dtype)
        return out

    def merged_embedding(self) -> jax.Array:
        """embedding + scaling * lora_a[t] @ lora_b[t], shape (num, dim), param dtype."""
        if self.lora_a is None:
            return self.embedding[...]
        return merge_factors(self.embedding[...], self.lora_a[...], self.lora_b[...], self.scaling, self.task)


def merge_factors(weight, lora_a, lora_b, scaling: float, task: int):
    """weight (*lead, in, *out) + scaling * lora_a[..., task] (*lead, in, r) @ lora_b[..., task] (*lead, r, *out).

    `lead` are stacked-layer axes: lora_a is (*lead, n, in, r), lora_b (*lead, n, r, *out).
    """
    lead = lora_a.ndim - 3
    a = lora_a[(slice(None),) * lead + (task,)]
    b = lora_b[(slice(None),) * lead + (task,)]
    b = b.reshape(*b.shape[:lead + 1], -1)
    delta = jnp.einsum("...ir,...ro->...io", a, b, precision=jax.lax.Precision.HIGHEST).reshape(weight.shape)
    return (weight + scaling * delta).astype(weight.dtype)


def merge_lora(model) -> None:
    """Fold every LoRA delta (the default task's) into its base weight and zero that task's lora_b, in place:
    the forward is unchanged and the LoRA factors then contribute nothing (full fine-tuning, LoRA merged)."""
    for _, module in nnx.iter_graph(model):
        if isinstance(module, LoRALinear) and module.lora_a is not None:
            module.kernel[...] = module.merged_kernel()
        elif isinstance(module, LoRAEmbed) and module.lora_a is not None:
            module.embedding[...] = module.merged_embedding()
        else:
            continue
        lead = module.lora_a[...].ndim - 3  # stacked-layer axes before (n, ...)
        index = (slice(None),) * lead + (module.task,)
        module.lora_b[...] = module.lora_b[...].at[index].set(0.0)


def frozen_patterns(mode: str) -> tuple[str, ...]:
    """`config.optim.frozen` regexes (searched in 'text_model/.../kernel' paths) for a text LoRA mode."""
    if mode not in TEXT_LORA_MODES:
        raise ValueError(f"config.text_lora={mode!r}; known: {TEXT_LORA_MODES}")
    return {
        "all": (),
        # every text_model parameter whose own name is not lora_a / lora_b
        "lora_only": (r"^text_model/(?!.*/lora_[ab]$)",),
        "base_only": (r"^text_model/.*/lora_[ab]$",),
        "merged": (r"^text_model/.*/lora_[ab]$",),
    }[mode]
