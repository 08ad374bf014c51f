"""jina-clip-v1, stage 1 (paper Table 2).

    jclip-train --config configs/jina_clip_v1/stage1.py --workdir workdirs/jina_clip_v1_stage1
    jclip-train --config configs/jina_clip_v1/stage1.py:runlocal ...     # tiny smoke run
"""

from jclip_jax.train_config import jina_clip_v1_stage


def get_config(arg=None):
    c = jina_clip_v1_stage(1, arg)
    # The paper starts from EVA02 (timm eva02_base_patch16_clip_224) and Jina-BERT-v2 weights:
    c.init.eva02 = "weights/eva02_base_patch16_clip_224.safetensors"
    c.init.jina_bert = "weights/jina-bert-v2-base-en.safetensors"
    return c
