"""Model configurations (ml_collections) for jina-clip, at the released sizes and tiny sizes for tests.

The field names follow jina-clip's `config.json` where one exists (see `convert/hf_layout.py` for the
mapping), so a config reads the same in both worlds.
"""

from __future__ import annotations

import ml_collections


def text_config(**overrides) -> ml_collections.ConfigDict:
    """Jina-BERT-v2 text tower; defaults are jina-bert-flash-implementation's (spec §1.2)."""
    c = ml_collections.ConfigDict()
    c.vocab_size = 30528
    c.hidden_size = 768
    c.num_hidden_layers = 12
    c.num_attention_heads = 12
    c.intermediate_size = 3072
    c.type_vocab_size = 2
    c.layer_norm_eps = 1e-12
    c.pad_token_id = 0
    c.hidden_dropout_prob = 0.1  # training only; attention-prob dropout is not applied (see jina_bert.py)
    c.max_length = 512  # encode_text's default truncation
    c.update(overrides)
    return c


def vision_config(**overrides) -> ml_collections.ConfigDict:
    """EVA02 image tower; defaults are jina-clip-v1's EVA02-B/16 at 224 px (spec §1.3)."""
    c = ml_collections.ConfigDict()
    c.image_size = 224
    c.patch_size = 16
    c.width = 768
    c.layers = 12
    c.head_width = 64
    c.mlp_ratio = 2.6667  # hidden = int(width * mlp_ratio) = 2048
    c.pt_hw_seq_len = 14  # rope table side; with intp_freq the grid positions are rescaled to it
    c.intp_freq = False
    c.patch_dropout = 0.1  # training only
    c.layer_norm_eps = 1e-6
    c.update(overrides)
    return c


def clip_config(text=None, vision=None, **overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.text = text if text is not None else text_config()
    c.vision = vision if vision is not None else vision_config()
    c.add_projections = False
    c.projection_dim = 768
    c.logit_scale_init_value = 2.6592  # ln(1/0.07)
    c.matryoshka_dimensions = ()
    # Execution options (not part of the checkpoint): bf16 compute with fp32 params for training,
    # float32 for parity; per-block rematerialisation; scan over layers (compile time flat in depth).
    c.dtype = "float32"
    c.param_dtype = "float32"
    c.remat = False
    # What remat keeps: 'nothing' (recompute each block whole), 'dots' (keep the projections' outputs,
    # recompute attention and elementwise ops: more memory, less recompute); see layers.REMAT_POLICIES.
    c.remat_policy = "nothing"
    c.scan_layers = True
    c.update(overrides)
    return c


def jina_clip_v1(**overrides) -> ml_collections.ConfigDict:
    """jina-clip-v1 exactly: 222,647,041 parameters."""
    return clip_config(**overrides)


def tiny(**overrides) -> ml_collections.ConfigDict:
    """A 2-layer, width-64 model for CPU tests and the demo."""
    text = text_config(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_length=64,
    )
    vision = vision_config(image_size=32, patch_size=8, width=64, layers=2, head_width=16, mlp_ratio=2.6667,
                           pt_hw_seq_len=4)
    return clip_config(text=text, vision=vision, projection_dim=64, **overrides)


def get(name: str) -> ml_collections.ConfigDict:
    """Model config by name: 'jina-clip-v1' or 'tiny'."""
    table = {"jina-clip-v1": jina_clip_v1, "tiny": tiny}
    if name not in table:
        raise ValueError(f"unknown model config {name!r}; known: {sorted(table)}")
    return table[name]()
