"""The demo: the tiny model on the embedded synthetic dataset, on a CPU, in a few minutes.

    jclip-train                                   # this config, workdir workdirs/demo
    jclip-train --config configs/demo.py --config.total_steps=100 --config.checkpoint_every=20
"""

from jclip_jax.models import configs as model_configs
from jclip_jax.training.config import base_config


def get_config(arg=None):
    del arg
    c = base_config(model_configs.tiny(), stage=1)
    c.total_steps = 600
    c.log_every = 50
    c.eval_every = 200
    c.checkpoint_every = 200
    c.mesh = (("data", -1),)
    # Written on first use. Unset data/eval paths default to its splits: train, text_pairs (triplets in
    # stage 3), eval, eval_text_pairs, tokenizer.json.
    c.data.synthetic_dir = "data/synthetic"
    c.data.image_batch_size = 64
    c.data.text_batch_size = 64
    c.data.image_max_length = 32
    c.data.text_max_length = 32
    c.optim.peak_lr = 1e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.025
    c.evals.batch_size = 64
    c.peak_flops_per_device = None
    return c
