"""The PyTorch (jina-clip / Hugging Face) state-dict layout of JinaCLIP, both ways (spec §4, §4.1).

One table, `layout(cfg)`, lists every tensor: its torch key, the flax parameter path it lives in, and
the two array maps between them. Per-block torch keys hold one slice of a flax array stacked on the
leading 'layers' axis. Everything here is numpy (or jax.numpy under eval_shape); torch is never needed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Keys a loader ignores, and only these: the RoPE tables (`rope.freqs_cos` / `rope.freqs_sin`) that Jina's EVA
# code saves as persistent buffers, at the tower's top level and in every block (`blocks.{i}.attn.rope.`).
# They are functions of the config, which we recompute (models/eva02.rope_tables).
IGNORED_KEY_PATTERN = re.compile(r"^(?:.+\.)?rope\.freqs_(?:cos|sin)$")


def is_ignored_key(key: str) -> bool:
    return IGNORED_KEY_PATTERN.match(key) is not None


Array = np.ndarray


@dataclass(frozen=True)
class Entry:
    torch_key: str  # may contain "{i}" for a per-block tensor
    flax_path: tuple[str, ...]
    to_torch: Callable[[Array], Array]  # one flax slice -> torch tensor
    to_flax: Callable[[Array, tuple[int, ...]], Array]  # torch tensor, flax slice shape -> flax slice
    stacked: bool = False


def _same(a, shape=None):
    return a


def _linear_to_torch(k):  # (in..., out...) -> [out, in]; flax groups are head-major like torch
    return k.reshape(k.shape[0], -1).T if k.ndim >= 2 else k


def _linear_to_flax(w, shape):
    return w.T.reshape(shape)


def _linear_in_grouped_to_torch(k):  # (heads, head_dim, out) -> [out, heads*head_dim]
    return k.reshape(-1, k.shape[-1]).T


def _reshape_to_torch(b):
    return b.reshape(-1)


def _reshape_to_flax(b, shape):
    return b.reshape(shape)


def _conv_to_torch(k):  # (kh, kw, in, out) -> [out, in, kh, kw]
    return k.transpose(3, 2, 0, 1)


def _conv_to_flax(w, shape):  # [out, in, kh, kw] -> (kh, kw, in, out)
    return w.transpose(2, 3, 1, 0)


def _linear(torch_prefix, flax_prefix, stacked, bias=True, grouped_in=False):
    kt = _linear_in_grouped_to_torch if grouped_in else _linear_to_torch
    out = [Entry(f"{torch_prefix}.weight", (*flax_prefix, "kernel"), kt, _linear_to_flax, stacked)]
    if bias:
        out.append(Entry(f"{torch_prefix}.bias", (*flax_prefix, "bias"), _reshape_to_torch, _reshape_to_flax,
                         stacked))
    return out


def _norm(torch_prefix, flax_prefix, stacked):
    return [Entry(f"{torch_prefix}.weight", (*flax_prefix, "scale"), _same, _same, stacked),
            Entry(f"{torch_prefix}.bias", (*flax_prefix, "bias"), _same, _same, stacked)]


def text_layout(prefix: str = "text_model.transformer.") -> list[Entry]:
    t, L = prefix, prefix + "encoder.layers.{i}."
    f = ("text_model", "layers")
    return [
        Entry(t + "embeddings.word_embeddings.weight", ("text_model", "word_embeddings", "embedding"),
              _same, _same),
        Entry(t + "embeddings.token_type_embeddings.weight",
              ("text_model", "token_type_embeddings", "embedding"), _same, _same),
        *_norm(t + "emb_ln", ("text_model", "emb_ln"), False),
        # Wqkv rows [q | k | v], head-major == flax features (3, heads, head_dim) flattened.
        *_linear(L + "mixer.Wqkv", (*f, "wqkv"), True),
        *_linear(L + "mixer.out_proj", (*f, "out_proj"), True, grouped_in=True),
        *_norm(L + "norm1", (*f, "norm1"), True),
        # gated_layers rows 0..I-1 = gate = flax (hidden, 2, I)[:, 0]; rows I..2I-1 = value.
        *_linear(L + "mlp.gated_layers", (*f, "gated_layers"), True, bias=False),
        *_linear(L + "mlp.wo", (*f, "wo"), True),
        *_norm(L + "norm2", (*f, "norm2"), True),
    ]


def _lora_a_to_torch(a):  # Linear lora_a (n, in, r) -> torch lora_A [n, r, in]
    return a.transpose(0, 2, 1)


def _lora_a_to_flax(w, shape):
    return w.transpose(0, 2, 1).reshape(shape)


def _lora_b_to_torch(b):  # Linear lora_b (n, r, *out) -> torch lora_B [n, out, r]
    return b.reshape(b.shape[0], b.shape[1], -1).transpose(0, 2, 1)


def _lora_b_to_flax(w, shape):
    return w.transpose(0, 2, 1).reshape(shape)


def _lora_linear(torch_prefix, flax_prefix, stacked, lora: bool):
    """A LoRA-parametrised Linear (torch.nn.utils.parametrize): weight under parametrizations.weight.original,
    the adapters under parametrizations.weight.0.lora_A / lora_B (index 0 = the first parametrization)."""
    if not lora:
        return _linear(torch_prefix, flax_prefix, stacked)
    w = f"{torch_prefix}.parametrizations.weight."
    return [
        Entry(w + "original", (*flax_prefix, "kernel"), _linear_to_torch, _linear_to_flax, stacked),
        Entry(w + "0.lora_A", (*flax_prefix, "lora_a"), _lora_a_to_torch, _lora_a_to_flax, stacked),
        Entry(w + "0.lora_B", (*flax_prefix, "lora_b"), _lora_b_to_torch, _lora_b_to_flax, stacked),
        Entry(f"{torch_prefix}.bias", (*flax_prefix, "bias"), _reshape_to_torch, _reshape_to_flax, stacked),
    ]


def _lora_embedding(torch_prefix, flax_prefix, lora: bool):
    """Embedding LoRA factors have the torch orientation already: lora_A [n, num, r], lora_B [n, r, dim]."""
    if not lora:
        return [Entry(f"{torch_prefix}.weight", (*flax_prefix, "embedding"), _same, _same)]
    w = f"{torch_prefix}.parametrizations.weight."
    return [Entry(w + "original", (*flax_prefix, "embedding"), _same, _same),
            Entry(w + "0.lora_A", (*flax_prefix, "lora_a"), _same, _same),
            Entry(w + "0.lora_B", (*flax_prefix, "lora_b"), _same, _same)]


def xlm_roberta_text_layout(lora: bool = True, prefix: str = "text_model.transformer.roberta.") -> list[Entry]:
    """jina-clip-v2's text tower (spec §5.2): XLMRobertaLoRA wraps `.roberta`; 8 + 20 per layer tensors."""
    t, L = prefix, prefix + "encoder.layers.{i}."
    f = ("text_model", "layers")
    return [
        *_lora_embedding(t + "embeddings.word_embeddings", ("text_model", "word_embeddings"), lora),
        *_lora_embedding(t + "embeddings.token_type_embeddings", ("text_model", "token_type_embeddings"), lora),
        *_norm(t + "emb_ln", ("text_model", "emb_ln"), False),
        # Wqkv rows [q | k | v], head-major == flax features (3, heads, head_dim) flattened.
        *_lora_linear(L + "mixer.Wqkv", (*f, "wqkv"), True, lora),
        *_lora_linear(L + "mixer.out_proj", (*f, "out_proj"), True, lora),
        *_norm(L + "norm1", (*f, "norm1"), True),
        *_lora_linear(L + "mlp.fc1", (*f, "fc1"), True, lora),
        *_lora_linear(L + "mlp.fc2", (*f, "fc2"), True, lora),
        *_norm(L + "norm2", (*f, "norm2"), True),
    ]


def text_layout_for(cfg) -> list[Entry]:
    """The text tower's entries for cfg.text: Jina-BERT-v2 (v1) or Jina-XLM-RoBERTa with LoRA (v2)."""
    if cfg.text.get("model_type", "jina_bert") == "xlm_roberta":
        return xlm_roberta_text_layout(lora=bool(cfg.text.lora_adaptations))
    return text_layout()


def vision_layout(prefix: str = "vision_model.") -> list[Entry]:
    v, B = prefix, prefix + "blocks.{i}."
    f = ("vision_model", "blocks")
    return [
        Entry(v + "cls_token", ("vision_model", "cls_token"), _same, _same),
        Entry(v + "pos_embed", ("vision_model", "pos_embed"), _same, _same),
        Entry(v + "patch_embed.proj.weight", ("vision_model", "patch_embed", "kernel"),
              _conv_to_torch, _conv_to_flax),
        Entry(v + "patch_embed.proj.bias", ("vision_model", "patch_embed", "bias"), _same, _same),
        *_norm(B + "norm1", (*f, "norm1"), True),
        Entry(B + "attn.q_bias", (*f, "q_proj", "bias"), _reshape_to_torch, _reshape_to_flax, True),
        Entry(B + "attn.v_bias", (*f, "v_proj", "bias"), _reshape_to_torch, _reshape_to_flax, True),
        *_linear(B + "attn.q_proj", (*f, "q_proj"), True, bias=False),
        *_linear(B + "attn.k_proj", (*f, "k_proj"), True, bias=False),
        *_linear(B + "attn.v_proj", (*f, "v_proj"), True, bias=False),
        *_norm(B + "attn.inner_attn_ln", (*f, "inner_attn_ln"), True),
        *_linear(B + "attn.proj", (*f, "proj"), True),
        *_norm(B + "norm2", (*f, "norm2"), True),
        *_linear(B + "mlp.w1", (*f, "w1"), True),
        *_linear(B + "mlp.w2", (*f, "w2"), True),
        *_norm(B + "mlp.ffn_ln", (*f, "ffn_ln"), True),
        *_linear(B + "mlp.w3", (*f, "w3"), True),
        *_norm(v + "norm", ("vision_model", "norm"), False),
    ]


def layout(cfg) -> list[Entry]:
    entries = [Entry("logit_scale", ("logit_scale",), _same, _same), *text_layout_for(cfg), *vision_layout()]
    if cfg.add_projections:  # [U] key names of jina-clip's optional projections (absent in v1/v2)
        entries += _linear("text_projection", ("text_projection",), False, bias=False)
        entries += _linear("visual_projection", ("visual_projection",), False, bias=False)
    return entries


def num_layers(cfg, entry: Entry) -> int:
    return cfg.text.num_hidden_layers if entry.flax_path[0] == "text_model" else cfg.vision.layers


def to_torch(cfg, flax_params: dict[tuple[str, ...], Array]) -> dict[str, Array]:
    """Flat flax params {path: array} -> torch state dict {key: array} (numpy or jax arrays)."""
    out = {}
    for e in layout(cfg):
        a = flax_params[e.flax_path]
        if e.stacked:
            for i in range(num_layers(cfg, e)):
                out[e.torch_key.format(i=i)] = e.to_torch(a[i])
        else:
            out[e.torch_key] = e.to_torch(a)
    return out


def check_keys(cfg, state_dict: dict[str, Array], flax_shapes: dict[tuple[str, ...], tuple[int, ...]],
               what: str, entries: list[Entry] | None = None, ignore_unexpected: bool = False) -> None:
    """Fail with one message naming every missing, unexpected and mis-shaped key."""
    entries = layout(cfg) if entries is None else entries
    expected = {}
    for e in entries:
        shape = flax_shapes[e.flax_path]
        if e.stacked:
            probe = e.to_torch(np.empty(shape[1:], np.float32))
            for i in range(num_layers(cfg, e)):
                expected[e.torch_key.format(i=i)] = probe.shape
        else:
            expected[e.torch_key] = e.to_torch(np.empty(shape, np.float32)).shape
    given = {k for k in state_dict if not is_ignored_key(k)}
    missing = sorted(set(expected) - given)
    unexpected = [] if ignore_unexpected else sorted(given - set(expected))
    misshaped = [f"{k}: expected {list(expected[k])}, got {list(np.shape(state_dict[k]))}"
                 for k in sorted(given & set(expected)) if tuple(np.shape(state_dict[k])) != tuple(expected[k])]
    problems = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = ", ".join(items[:12]) + (f", ... ({len(items) - 12} more)" if len(items) > 12 else "")
            problems.append(f"{len(items)} {name} key(s): {shown}")
    if problems:
        raise ValueError(f"{what} does not match the model config:\n  " + "\n  ".join(problems))


def to_flax(cfg, state_dict: dict[str, Array], flax_shapes: dict[tuple[str, ...], tuple[int, ...]],
            entries: list[Entry] | None = None) -> dict[tuple[str, ...], np.ndarray]:
    """Torch state dict -> flat flax params {path: np.ndarray}; call check_keys first."""
    out = {}
    for e in layout(cfg) if entries is None else entries:
        shape = flax_shapes[e.flax_path]
        if e.stacked:
            out[e.flax_path] = np.stack([
                e.to_flax(np.asarray(state_dict[e.torch_key.format(i=i)]), shape[1:])
                for i in range(num_layers(cfg, e))])
        else:
            out[e.flax_path] = np.asarray(e.to_flax(np.asarray(state_dict[e.torch_key]), shape))
    return out
