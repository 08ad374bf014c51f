"""jina-clip-v1, stage 3 (paper Table 2).

    jclip-train --config configs/jina_clip_v1/stage3.py --workdir workdirs/jina_clip_v1_stage3
    jclip-train --config configs/jina_clip_v1/stage3.py:runlocal ...     # tiny smoke run
"""

from jclip_jax.train_config import jina_clip_v1_stage


def get_config(arg=None):
    c = jina_clip_v1_stage(3, arg)
    c.init.checkpoint = "workdirs/jina_clip_v1_stage2"  # stage 2's workdir: its latest params
    return c
