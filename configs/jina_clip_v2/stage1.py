"""jina-clip-v2, stage 1 (arXiv 2412.08802): short image-caption pairs + text pairs at 224 px, 77 tokens.

    jclip-train --config configs/jina_clip_v2/stage1.py --workdir workdirs/jina_clip_v2_stage1
    jclip-train --config configs/jina_clip_v2/stage1.py:runlocal ...     # tiny-v2 smoke run

Sources of each figure (see jclip_jax/train_config.jina_clip_v2_stage): image size and max length from the
paper's stage descriptions; Matryoshka dims from jina-clip-v2's config.json; learning rate, batch sizes, steps
and warmup are [chosen] (v1's Table 2; the v2 values were not found in the sources read).
"""

from jclip_jax.train_config import jina_clip_v2_stage


def get_config(arg=None):
    c = jina_clip_v2_stage(1, arg)
    if arg != "runlocal":
        # The paper starts from EVA02-L/14 (timm eva02_large_patch14_clip_224) and jina-embeddings-v3's
        # Jina-XLM-RoBERTa; jina-embeddings-v3's own LoRA adapters are not loaded (load_trained_adapters: false).
        c.init.eva02 = "weights/eva02_large_patch14_clip_224.safetensors"
        c.init.jina_embeddings_v3 = "weights/jina-embeddings-v3.safetensors"
    return c
