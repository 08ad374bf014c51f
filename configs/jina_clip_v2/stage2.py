"""jina-clip-v2, stage 2 (arXiv 2412.08802): long image-caption pairs + text pairs at 384 px, 512 tokens.

    jclip-train --config configs/jina_clip_v2/stage2.py --workdir workdirs/jina_clip_v2_stage2
    jclip-train --config configs/jina_clip_v2/stage2.py:runlocal ...     # tiny-v2 smoke run

Sources of each figure (see jclip_jax/train_config.jina_clip_v2_stage): image size and max length from the
paper's stage descriptions; Matryoshka dims from jina-clip-v2's config.json; learning rate, batch sizes, steps
and warmup are [chosen] (v1's Table 2; the v2 values were not found in the sources read).
"""

from jclip_jax.train_config import jina_clip_v2_stage


def get_config(arg=None):
    c = jina_clip_v2_stage(2, arg)
    if arg != "runlocal":  # the previous stage's workdir; pos_embed is resampled to this grid at load
        c.init.checkpoint = "workdirs/jina_clip_v2_stage1"
    return c
