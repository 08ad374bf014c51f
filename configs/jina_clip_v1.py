"""jina-clip-v1's three-stage recipe (paper §4, Table 2): JinaBERT + EVA02-B/16 at 224 px.

    jclip-train --config configs/jina_clip_v1.py:stage=1 --workdir workdirs/jina_clip_v1_stage1
    jclip-train --config configs/jina_clip_v1.py:stage=2 --workdir workdirs/jina_clip_v1_stage2
    jclip-train --config configs/jina_clip_v1.py:stage=3 --workdir workdirs/jina_clip_v1_stage3
    jclip-train --config configs/jina_clip_v1.py:stage=1,runlocal --workdir workdirs/v1_stage1_local  # a smoke run
    jclip-train --config configs/jina_clip_v1.py:stage=2,runlocal --workdir workdirs/v1_stage2_local \
        --config.init.checkpoint=workdirs/v1_stage1_local          # stages chain locally as on the pod
    jclip-compile --config configs/jina_clip_v1.py:stage=1 --topology v5p:4x4x4

Stage 1: image-caption pairs (LAION-400M) + text pairs, 77 tokens. Stage 2: long (synthetic) captions + text
pairs, 512 tokens. Stage 3: long captions + hard-negative triplets (7 negatives per query), 512 tokens.
Each stage starts from the previous stage's workdir (config.init.checkpoint). Tags: [P] the paper, [U] not
given in the paper (our choice).
"""

from jclip_jax.models import configs as model_configs
from jclip_jax.training.config import base_config, parse_arg, runlocal

TABLE2 = {  # [P] Table 2. stage: (peak lr, image-text batch, text batch, steps, max length)
    1: (1e-4, 32_768, 32_768, 60_000, 77),
    2: (5e-6, 8_192, 8_192, 1_500, 512),
    3: (1e-6, 1_024, 1_024, 7_000, 512),
}
WARMUP_STEPS = {1: 1_000, 2: 100, 3: 500}  # [U] not given in the paper


def get_config(arg=None):
    arg = parse_arg(arg, stage=1, runlocal=False)
    stage = arg.stage
    if stage not in TABLE2:
        raise ValueError(f"configs/jina_clip_v1.py: stage={stage}; the recipe has stages {sorted(TABLE2)}")
    lr, image_batch, text_batch, steps, max_length = TABLE2[stage]
    # bf16 compute with fp32 master params; remat per block so 32k batches fit with GradCache.
    model = model_configs.jina_clip_v1(dtype="bfloat16", remat=True, scan_layers=True)
    c = base_config(model, stage)  # the losses of the stage: c.loss.stage (training/losses.STAGE_TASKS)
    c.total_steps = steps
    c.optim.peak_lr = lr
    c.optim.warmup_steps = WARMUP_STEPS[stage]
    c.data.image_batch_size = image_batch
    c.data.text_batch_size = text_batch
    c.data.image_max_length = max_length
    c.data.text_max_length = max_length
    c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
    c.micro_batches = 1  # raise (e.g. 8) to fit the batch through GradCache on few devices
    # Point these at your prepared data (jclip-prepare) and tokenizer (jina-clip-v1's tokenizer.json):
    c.data.image_text_dir = "data/laion400m" if stage == 1 else "data/long_captions"
    c.data.text_dir = "data/text_pairs" if stage < 3 else "data/triplets"
    c.data.tokenizer_path = "data/tokenizer.json"
    c.evals.image_text_dir = "data/eval/flickr30k_test"
    c.evals.text_pairs_dir = None
    c.log_every, c.eval_every, c.checkpoint_every = 50, 5_000, 1_000
    if stage == 1:  # [P] EVA02 (timm eva02_base_patch16_clip_224) and Jina-BERT-v2 weights
        c.init.eva02 = "weights/eva02_base_patch16_clip_224.safetensors"
        c.init.jina_bert = "weights/jina-bert-v2-base-en.safetensors"
    else:  # the previous stage's workdir: its latest params
        c.init.checkpoint = f"workdirs/jina_clip_v1_stage{stage - 1}"
    if arg.runlocal:  # the tiny model (2 layers, width 64, 32 px), the embedded data, 10 steps
        runlocal(c, f"configs/jina_clip_v1.py:stage={stage}", model_configs.tiny(), max_length=32 if stage == 1 else 64)
    return c
