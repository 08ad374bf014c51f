"""jina-clip-v1, stage 2 (paper Table 2).

    jclip-train --config configs/jina_clip_v1/stage2.py --workdir workdirs/jina_clip_v1_stage2
    jclip-train --config configs/jina_clip_v1/stage2.py:runlocal ...     # tiny smoke run
"""

from jclip_jax.train_config import jina_clip_v1_stage


def get_config(arg=None):
    c = jina_clip_v1_stage(2, arg)
    c.init.checkpoint = "workdirs/jina_clip_v1_stage1"  # stage 1's workdir: its latest params
    return c
