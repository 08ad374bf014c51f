"""Fine-tune a jina-clip model on your own image-caption pairs.

    jclip-prepare image-text --format folder --input captions.csv --image-root images/ --output data/mine
    jclip-train --config configs/finetune.py:jina-clip-v1/ --workdir workdirs/mine \
        --config.data.image_text_dir=data/mine
    jclip-convert to-torch --checkpoint workdirs/mine --output jina-clip-v1-mine/
    jclip-train --config configs/finetune.py:jina-clip-v1/,runlocal --workdir workdirs/mine_local  # a smoke run

The config argument is where to start: a jina-clip HF directory (config.json + model.safetensors +
tokenizer.json) or a jclip-train workdir. config.model and the tokenizer follow it, so nothing has to be
kept in sync by hand. The loss is the image<->text InfoNCE alone (no text pairs needed).

Fine-tuning controls (jclip_jax/training/optim.py), e.g.
    --config.optim.frozen='("^vision_model/",)'                    LiT: train the text tower only
    --config.optim.lr_mults='(("^vision_model/", 0.1),)'            a tenth of the lr for the image tower
    --config.optim.layer_decay.vision=0.75                          EVA-CLIP layer-wise lr decay
"""

from jclip_jax.loading import model_config_and_tokenizer
from jclip_jax.models import configs as model_configs
from jclip_jax.training.config import base_config, runlocal


def get_config(arg=None):
    # "PATH", "PATH,runlocal" (PATH's model on the embedded data) or "runlocal" (the tiny model from scratch)
    parts = [p for p in (arg or "").split(",") if p]
    smoke = "runlocal" in parts
    sources = [p for p in parts if p != "runlocal"]
    if len(sources) > 1 or not (sources or smoke):
        raise ValueError("configs/finetune.py needs the model to start from: --config configs/finetune.py:PATH "
                         "(a jina-clip directory or a jclip-train workdir), PATH,runlocal or runlocal")
    source = sources[0] if sources else None
    model, tokenizer = model_config_and_tokenizer(source) if source else (model_configs.tiny(), "")
    c = base_config(model, stage=1)
    c.init.checkpoint = source
    c.data.tokenizer_path = tokenizer
    c.data.image_text_dir = ""  # your jclip-prepare output
    c.data.text_dir = None
    c.loss.tasks = ("image_text",)
    c.total_steps = 1_000
    c.data.image_batch_size = 256
    c.data.image_max_length = 77
    c.optim.peak_lr = 1e-5  # fine-tuning: well below stage 1's 1e-4
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.1
    c.log_every = 20
    c.eval_every = 0  # set with config.evals.image_text_dir (a held-out prepared directory)
    c.checkpoint_every = 200
    c.evals.image_text_dir = None
    c.evals.text_pairs_dir = None
    if smoke:  # the embedded image-caption pairs; from PATH's weights and tokenizer, or a tiny model from scratch
        runlocal(c, f"configs/finetune.py:{arg}", None, max_length=32)
        c.init.checkpoint = source
        if not source:
            c.data.tokenizer_path = ""  # the synthetic tokenizer
    return c
