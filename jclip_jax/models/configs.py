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


def xlm_roberta_text_config(**overrides) -> ml_collections.ConfigDict:
    """Jina-XLM-RoBERTa text tower of jina-embeddings-v3 with jina-clip-v2's LoRA (spec §5.1, §5.4)."""
    c = ml_collections.ConfigDict()
    c.model_type = "xlm_roberta"  # selects models/xlm_roberta.py (v1's text config has no such field)
    c.vocab_size = 250002
    c.hidden_size = 1024
    c.num_hidden_layers = 24
    c.num_attention_heads = 16
    c.intermediate_size = 4096
    c.type_vocab_size = 1
    c.layer_norm_eps = 1e-5
    c.pad_token_id = 1  # XLM-R: <s>=0, <pad>=1, </s>=2
    c.hidden_dropout_prob = 0.1  # training only
    c.max_length = 512  # encode_text's default truncation (jina-clip's encode_text)
    # jina-embeddings-v3's config.json (the class default is 10000; the checkpoint's value is what counts)
    c.rotary_emb_base = 20000.0
    # jina-clip-v2's config.json: one adaptation, rank 4, alpha 4 (scaling 1.0), applied on every forward
    c.lora_adaptations = ("retrieval.query",)
    c.lora_rank = 4
    c.lora_alpha = 4.0
    c.default_lora_task = "retrieval.query"
    # (task, instruction) pairs: encode_text(task=...) prepends the instruction (pairs: task names hold dots)
    c.task_instructions = (("retrieval.query", "Represent the query for retrieving evidence documents: "),)
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
    # 'xla' (jax.nn.dot_product_attention; the logits go through HBM) or 'flash' (a fused kernel on TPU or
    # GPU; jina-clip-v1's ALiBi text tower keeps 'xla'); see models/layers.py.
    c.attention = "xla"
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


def jina_clip_v2(**overrides) -> ml_collections.ConfigDict:
    """jina-clip-v2 exactly: Jina-XLM-RoBERTa + one rank-4 LoRA, EVA02-L/14 at 512 px; 865,278,477 parameters."""
    # EVA02-L/14 (spec §5.1): hidden int(1024 * 2.6667) = 2730; 512 // 14 = 36 patches a side (8 px unused);
    # RoPE positions interpolated to pt_hw_seq_len 16.
    vision = vision_config(image_size=512, patch_size=14, width=1024, layers=24, head_width=64, mlp_ratio=2.6667,
                           pt_hw_seq_len=16, intp_freq=True)
    return clip_config(text=xlm_roberta_text_config(), vision=vision, projection_dim=1024,
                       matryoshka_dimensions=(32, 64, 128, 256, 512, 768, 1024), **overrides)


def tiny_v2(**overrides) -> ml_collections.ConfigDict:
    """A 2-layer, width-64 v2 model (RoPE + LoRA text tower; 36 px / patch 8 leaves a 4 px remainder)."""
    text = xlm_roberta_text_config(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_length=64,
    )
    vision = vision_config(image_size=36, patch_size=8, width=64, layers=2, head_width=16, mlp_ratio=2.6667,
                           pt_hw_seq_len=3, intp_freq=True)
    return clip_config(text=text, vision=vision, projection_dim=64, matryoshka_dimensions=(16, 32, 64),
                       **overrides)


def get(name: str) -> ml_collections.ConfigDict:
    """Model config by name: 'jina-clip-v1', 'jina-clip-v2', 'tiny' or 'tiny-v2'."""
    table = {"jina-clip-v1": jina_clip_v1, "tiny": tiny, "jina-clip-v2": jina_clip_v2, "tiny-v2": tiny_v2}
    if name not in table:
        raise ValueError(f"unknown model config {name!r}; known: {sorted(table)}")
    return table[name]()
