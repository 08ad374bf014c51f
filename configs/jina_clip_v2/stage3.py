"""jina-clip-v2, stage 3 (arXiv 2412.08802): long image-caption pairs + hard-negative triplets, 512 px/tokens.

    jclip-train --config configs/jina_clip_v2/stage3.py --workdir workdirs/jina_clip_v2_stage3
    jclip-train --config configs/jina_clip_v2/stage3.py:runlocal ...     # tiny-v2 smoke run

Sources of each figure (see jclip_jax/train_config.jina_clip_v2_stage): image size and max length from the
paper's stage descriptions; Matryoshka dims from jina-clip-v2's config.json; learning rate, batch sizes, steps
and warmup are [chosen] (v1's Table 2; the v2 values were not found in the sources read).
"""

from jclip_jax.train_config import jina_clip_v2_stage


def get_config(arg=None):
    c = jina_clip_v2_stage(3, arg)
    if arg != "runlocal":  # the previous stage's workdir; pos_embed is resampled to this grid at load
        c.init.checkpoint = "workdirs/jina_clip_v2_stage2"
    return c
