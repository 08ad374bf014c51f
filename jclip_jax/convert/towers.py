"""Import pretrained single-tower state dicts into a JinaCLIP, so stage 1 starts as the paper does.

- EVA02 from timm (`eva02_base_patch16_clip_224` key names) -> the image tower.
- Jina-BERT-v2 in its original (non-flash) layout, e.g. jina-bert-v2-base-en / jina-embeddings-v2,
  -> the text tower. A state dict already in the flash-port layout of jina-clip is accepted too.
- jina-embeddings-v3 (Jina-XLM-RoBERTa, xlm-roberta-flash-implementation key names, with or without LoRA
  parametrizations) -> the v2 text tower's base weights.

Both are renamed to jina-clip's own key layout and then go through the same table as from_pretrained.
"""

from __future__ import annotations

import re

import numpy as np
from flax import nnx

from jclip_jax.convert import hf_layout, torch_layout

# timm Eva (EVA02-CLIP) names -> jina-clip vision_model names (the inverse of timm's checkpoint filter).
TIMM_EVA_RENAMES = (
    (r"^blocks\.(\d+)\.attn\.q_proj\.bias$", r"blocks.\1.attn.q_bias"),
    (r"^blocks\.(\d+)\.attn\.v_proj\.bias$", r"blocks.\1.attn.v_bias"),
    (r"^blocks\.(\d+)\.attn\.norm\.", r"blocks.\1.attn.inner_attn_ln."),
    (r"^blocks\.(\d+)\.mlp\.fc1_g\.", r"blocks.\1.mlp.w1."),
    (r"^blocks\.(\d+)\.mlp\.fc1_x\.", r"blocks.\1.mlp.w2."),
    (r"^blocks\.(\d+)\.mlp\.norm\.", r"blocks.\1.mlp.ffn_ln."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"blocks.\1.mlp.w3."),
)
# timm keys with no counterpart in a CLS-pooled, head-less tower.
TIMM_IGNORED = re.compile(r"^(head\.|fc_norm\.|rope\.)")


def timm_eva02_to_jina(state_dict: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """timm Eva state dict -> ({jina vision_model.* key: array}, ignored timm keys)."""
    out, ignored = {}, []
    for key, value in state_dict.items():
        if TIMM_IGNORED.match(key):
            if not (key.startswith("head.") and np.size(value) == 0):
                ignored.append(key)
            continue
        for pattern, repl in TIMM_EVA_RENAMES:
            key = re.sub(pattern, repl, key)
        out["vision_model." + key] = np.asarray(value)
    return out, ignored


def jina_bert_v2_to_jina(state_dict: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Original Jina-BERT-v2 state dict -> ({jina-clip text_model.transformer.* key: array}, ignored keys).

    [U] original names (JinaBERT v2 `modeling_bert.py`): embeddings.LayerNorm, encoder.layer.N.attention
    .self.{query,key,value}, attention.output.{dense,LayerNorm}, mlp.{gated_layers,wo,layernorm}; an optional
    `bert.` prefix; `pooler.*` and `cls.*` (MLM head) are not part of the tower.
    """
    sd = {k[len("bert."):] if k.startswith("bert.") else k: np.asarray(v) for k, v in state_dict.items()}
    if any(k.startswith("encoder.layers.") for k in sd):  # already the flash-port layout
        return {"text_model.transformer." + k: v for k, v in sd.items()}, []
    out, ignored = {}, []
    renames = (
        (r"^embeddings\.LayerNorm\.", "emb_ln."),
        (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"encoder.layers.\1.mixer.out_proj."),
        (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"encoder.layers.\1.norm1."),
        (r"^encoder\.layer\.(\d+)\.mlp\.gated_layers\.", r"encoder.layers.\1.mlp.gated_layers."),
        (r"^encoder\.layer\.(\d+)\.mlp\.wo\.", r"encoder.layers.\1.mlp.wo."),
        (r"^encoder\.layer\.(\d+)\.mlp\.layernorm\.", r"encoder.layers.\1.norm2."),
    )
    qkv: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in sd.items():
        m = re.match(r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)$", key)
        if m:
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = value
            continue
        if key.startswith(("pooler.", "cls.")) or key.endswith("position_ids"):
            ignored.append(key)
            continue
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out["text_model.transformer." + key] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"layer {layer}: attention {kind} needs query, key and value; got {sorted(parts)}")
        # Wqkv rows are [q | k | v] (flash-attn layout), so concatenate along the output dim.
        out[f"text_model.transformer.encoder.layers.{layer}.mixer.Wqkv.{kind}"] = np.concatenate(
            [parts["query"], parts["key"], parts["value"]], axis=0)
    return out, ignored


def _import_tower(model, jina_sd, entries, what):
    shapes = {k: tuple(v.shape) for k, v in hf_layout.flax_params(model).items()}
    torch_layout.check_keys(model.cfg, jina_sd, shapes, what=what, entries=entries)
    params = torch_layout.to_flax(model.cfg, jina_sd, shapes, entries=entries)
    nnx.update(model, hf_layout.with_values(nnx.state(model, nnx.Param), params, partial=True, what=what))


def import_timm_eva02(model, state_dict, what: str = "timm EVA02 state dict") -> list[str]:
    """Load a timm EVA02 state dict into `model.vision_model` in place; returns the ignored keys."""
    jina_sd, ignored = timm_eva02_to_jina(state_dict)
    _import_tower(model, jina_sd, torch_layout.vision_layout(), what)
    return ignored


def import_jina_bert_v2(model, state_dict, what: str = "Jina-BERT-v2 state dict") -> list[str]:
    """Load a Jina-BERT-v2 state dict into `model.text_model` in place; returns the ignored keys."""
    jina_sd, ignored = jina_bert_v2_to_jina(state_dict)
    _import_tower(model, jina_sd, torch_layout.text_layout(), what)
    return ignored


# jina-embeddings-v3 keys that are not part of the text tower (MLM head, pooler).
JINA_V3_IGNORED = re.compile(r"^(lm_head\.|pooler\.|classifier\.)")


def jina_embeddings_v3_to_jina(state_dict: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """jina-embeddings-v3 state dict -> ({jina-clip-v2 text_model.transformer.roberta.* plain key: array},
    ignored keys).

    Keys may carry the `roberta.` prefix (XLMRobertaLoRA) or not, and LoRA parametrizations or not: a
    `parametrizations.weight.original` becomes the plain `.weight`; v3's own adapters (`...weight.0.lora_A/B`,
    five tasks, alpha 1) are ignored, as jina-clip-v2 does (`load_trained_adapters: false`: its one rank-4
    adapter starts from its init).
    """
    out, ignored = {}, []
    for key, value in state_dict.items():
        k = key[len("roberta."):] if key.startswith("roberta.") else key
        if JINA_V3_IGNORED.match(k) or ".parametrizations.weight.0.lora_" in k:
            ignored.append(key)
            continue
        k = k.replace(".parametrizations.weight.original", ".weight")
        out["text_model.transformer.roberta." + k] = np.asarray(value)
    return out, ignored


def import_jina_embeddings_v3(model, state_dict, what: str = "jina-embeddings-v3 state dict") -> list[str]:
    """Load jina-embeddings-v3's base weights into `model.text_model` (a v2 config) in place; the LoRA factors
    keep their values. Returns the ignored keys."""
    if model.cfg.text.get("model_type") != "xlm_roberta":
        raise ValueError(f"{what}: jina-embeddings-v3 weights need a jina-clip-v2 model config (Jina-XLM-RoBERTa "
                         "text tower)")
    jina_sd, ignored = jina_embeddings_v3_to_jina(state_dict)
    _import_tower(model, jina_sd, torch_layout.xlm_roberta_text_layout(lora=False), what)
    return ignored
