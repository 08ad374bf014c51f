"""jina-clip-v2's three-stage recipe (arXiv 2412.08802): Jina-XLM-RoBERTa (LoRA) + EVA02-L/14, Matryoshka.

    jclip-train --config configs/jina_clip_v2.py:stage=1 --workdir workdirs/jina_clip_v2_stage1
    jclip-train --config configs/jina_clip_v2.py:stage=2 --workdir workdirs/jina_clip_v2_stage2
    jclip-train --config configs/jina_clip_v2.py:stage=3 --workdir workdirs/jina_clip_v2_stage3
    jclip-train --config configs/jina_clip_v2.py:stage=1,runlocal --workdir workdirs/v2_stage1_local  # a smoke run
    jclip-train --config configs/jina_clip_v2.py:stage=2,runlocal --workdir workdirs/v2_stage2_local \
        --config.init.checkpoint=workdirs/v2_stage1_local          # 32 -> 48 px: pos_embed resampled
    jclip-compile --config configs/jina_clip_v2.py:stage=2 --topology v5p:4x4x4

Stage 1: short image-caption pairs + text pairs at 224 px, 77 tokens. Stage 2: long captions + text pairs at
384 px, 512 tokens. Stage 3: long captions + hard-negative triplets at 512 px, 512 tokens. The image size
changes between stages: config.init.checkpoint of the previous stage loads with vision_model/pos_embed
resampled to the new grid (training/initial_weights.resample_image_positions).
Tags: [P] the paper, [C] jina-clip-v2's config.json, [chosen] not found in the sources read.
"""

from jclip_jax.models import configs as model_configs
from jclip_jax.training.config import base_config, parse_arg, runlocal

STAGE_SHAPES = {1: (224, 77), 2: (384, 512), 3: (512, 512)}  # [P] stage: (image size, max length)
# [chosen] stage: (peak lr, image-text batch, text batch, steps), warmup: v1's Table 2 values and warmups.
STAGE_SCHEDULE = {1: (1e-4, 32_768, 32_768, 60_000), 2: (5e-6, 8_192, 8_192, 1_500), 3: (1e-6, 1_024, 1_024, 7_000)}
WARMUP_STEPS = {1: 1_000, 2: 100, 3: 500}
RUNLOCAL_IMAGE_SIZE = {1: 32, 2: 48, 3: 64}  # 224 -> 384 -> 512 scaled down: 4 -> 6 -> 8 patches a side


def get_config(arg=None):
    arg = parse_arg(arg, stage=1, runlocal=False)
    stage = arg.stage
    if stage not in STAGE_SHAPES:
        raise ValueError(f"configs/jina_clip_v2.py: stage={stage}; the recipe has stages {sorted(STAGE_SHAPES)}")
    image_size, max_length = STAGE_SHAPES[stage]
    lr, image_batch, text_batch, steps = STAGE_SCHEDULE[stage]
    model = model_configs.jina_clip_v2(dtype="bfloat16", remat=True, scan_layers=True)
    model.vision.image_size = image_size
    c = base_config(model, stage)  # the losses of the stage: c.loss.stage (training/losses.STAGE_TASKS)
    c.total_steps = steps
    c.optim.peak_lr = lr
    c.optim.warmup_steps = WARMUP_STEPS[stage]
    c.data.image_batch_size, c.data.text_batch_size = image_batch, text_batch
    c.data.image_max_length = c.data.text_max_length = max_length
    # [C] Matryoshka loss on config.json's `matryoshka_dimensions`; equal weights [chosen].
    c.loss.matryoshka_dims = tuple(model.matryoshka_dimensions)
    c.loss.matryoshka_weights = (1.0,) * len(c.loss.matryoshka_dims)
    # [chosen] full fine-tuning of the text tower with its LoRA. config.json says lora_main_params_trainable:
    # false [C]; set text_lora='lora_only' to train only the LoRA factors of the text tower.
    c.text_lora = "all"
    c.data.image_text_dir = "data/image_text_short" if stage == 1 else "data/image_text_long"
    c.data.text_dir = "data/text_pairs" if stage < 3 else "data/triplets"
    c.data.tokenizer_path = "data/xlm_roberta_tokenizer.json"  # jina-embeddings-v3's tokenizer.json
    c.evals.image_text_dir = "data/eval/flickr30k_test"
    c.evals.text_pairs_dir = None
    if stage == 1:
        # [P] EVA02-L/14 (timm eva02_large_patch14_clip_224) and jina-embeddings-v3's Jina-XLM-RoBERTa;
        # jina-embeddings-v3's own LoRA adapters are not loaded (load_trained_adapters: false [C]).
        c.init.eva02 = "weights/eva02_large_patch14_clip_224.safetensors"
        c.init.jina_embeddings_v3 = "weights/jina-embeddings-v3.safetensors"
    else:  # the previous stage's workdir; pos_embed is resampled to this grid at load
        c.init.checkpoint = f"workdirs/jina_clip_v2_stage{stage - 1}"
    if arg.runlocal:  # tiny-v2 (2 layers, width 64), the image size still growing between stages, 10 steps
        small = model_configs.tiny_v2()
        small.vision.image_size = RUNLOCAL_IMAGE_SIZE[stage]
        runlocal(c, f"configs/jina_clip_v2.py:stage={stage}", small, max_length=32 if stage == 1 else 64)
    return c
