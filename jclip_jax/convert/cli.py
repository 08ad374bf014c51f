"""jclip-convert: move weights between PyTorch formats and jclip-jax.

  jclip-convert from-towers --model jina-clip-v1 --eva02 eva.safetensors --jina-bert bert.safetensors \
      --tokenizer tokenizer.json --output DIR
  jclip-convert from-towers --model jina-clip-v2 --eva02 eva02_large_patch14_clip_224.safetensors \
      --jina-embeddings-v3 jina-embeddings-v3.safetensors --tokenizer tokenizer.json --output DIR
      Assemble a jina-clip HF directory from pretrained towers (the paper's stage-1 init): the image
      tower from a timm EVA02 state dict, the text tower from a Jina-BERT-v2 state dict. A tower left out
      keeps its random init (and is reported).
  jclip-convert to-torch --checkpoint WORKDIR --output DIR [--step N]
      Export a training workdir's latest (or step N) params to the jina-clip HF layout that
      JinaCLIP.from_pretrained (and jina-clip's PyTorch code) reads, with the run's tokenizer.
  jclip-convert check DIR
      Load a jina-clip HF directory (config.json + model.safetensors) and print a summary; fails naming
      the tensors that hold NaN/Inf or are integers where the model has float parameters.

Weight files: .safetensors is read with safetensors+numpy; .bin/.pt/.pth need torch (the `torch` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def from_towers(args) -> dict:
    from flax import nnx

    from jclip_jax import JinaCLIP
    from jclip_jax.convert.towers import import_jina_bert_v2, import_jina_embeddings_v3, import_timm_eva02
    from jclip_jax.loading import read_weights
    from jclip_jax.models import configs
    from jclip_jax.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(args.tokenizer) if args.tokenizer else None
    model = JinaCLIP(configs.get(args.model), rngs=nnx.Rngs(args.seed), tokenizer=tokenizer)
    report = {"output": args.output, "model": args.model, "random_init": []}
    if args.eva02:
        report["eva02_ignored_keys"] = import_timm_eva02(model, read_weights(args.eva02), what=args.eva02)
    else:
        report["random_init"].append("vision_model")
    if args.jina_bert and args.jina_embeddings_v3:
        raise ValueError("give one text tower: --jina-bert (jina-clip-v1) or --jina-embeddings-v3 (jina-clip-v2)")
    if args.jina_bert:
        report["jina_bert_ignored_keys"] = import_jina_bert_v2(model, read_weights(args.jina_bert),
                                                               what=args.jina_bert)
    elif args.jina_embeddings_v3:
        report["jina_embeddings_v3_ignored_keys"] = import_jina_embeddings_v3(
            model, read_weights(args.jina_embeddings_v3), what=args.jina_embeddings_v3)
    else:
        report["random_init"].append("text_model")
    model.save_pretrained(args.output)
    return report


def to_torch(args) -> dict:
    from jclip_jax import loading
    from jclip_jax.training import checkpoints

    step = checkpoints.latest_step(args.checkpoint) if args.step is None else args.step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {os.path.join(args.checkpoint, 'checkpoints')!r}")
    model = loading.load_model(args.checkpoint, step=step, require_tokenizer=False)
    model.save_pretrained(args.output)
    return {"output": args.output, "checkpoint": args.checkpoint, "step": int(step),
            "tokenizer": model.tokenizer.path if model.tokenizer else None}


def check(args) -> dict:
    """Loads the directory and refuses (one line) weights with NaN/Inf or integer tensors in float slots."""
    from jclip_jax import JinaCLIP
    from jclip_jax.convert import hf_layout, torch_layout

    hf_layout.read_config(args.directory)  # config.json first: its errors name the directory
    weights = os.path.join(args.directory, hf_layout.WEIGHTS_FILE)
    state_dict = hf_layout.read_state_dict(weights)
    mapped = {k for k in state_dict if not torch_layout.is_ignored_key(k)}  # all float slots
    problems = hf_layout.tensor_problems(state_dict, mapped)
    if problems:
        raise ValueError(f"{weights}: {len(problems)} bad tensor(s): " + "; ".join(problems[:5]) +
                         ("; ..." if len(problems) > 5 else ""))
    model = JinaCLIP.from_pretrained(args.directory)
    params = hf_layout.flax_params(model)
    return {
        "directory": args.directory,
        "parameters": int(sum(np.prod(p.shape) for p in params.values())),
        "embed_dim": model.embed_dim,
        "image_size": model.cfg.vision.image_size,
        "tokenizer": model.tokenizer.path if model.tokenizer else None,
        "logit_scale": float(np.asarray(model.logit_scale[...])),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jclip-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("from-towers", help="assemble a jina-clip directory from pretrained towers")
    p.add_argument("--model", default="jina-clip-v1",
                   help="model config name: jina-clip-v1 | jina-clip-v2 | tiny | tiny-v2")
    p.add_argument("--eva02", help="timm EVA02 state dict (eva02_base_patch16_clip_224 for v1, "
                                   "eva02_large_patch14_clip_224 for v2)")
    p.add_argument("--jina-bert", help="Jina-BERT-v2 state dict (v1's text tower)")
    p.add_argument("--jina-embeddings-v3", help="jina-embeddings-v3 state dict (v2's text tower; with or without "
                                                "LoRA parametrizations; its adapters are not imported)")
    p.add_argument("--tokenizer", help="tokenizer.json (or sentencepiece .model) to ship alongside")
    p.add_argument("--seed", type=int, default=0, help="init seed of anything not imported")
    p.add_argument("--output", required=True)
    p.set_defaults(run=from_towers)
    p = sub.add_parser("to-torch", help="export a training workdir's checkpoint to the jina-clip HF layout")
    p.add_argument("--checkpoint", required=True, help="the training workdir (or a gs:// path)")
    p.add_argument("--step", type=int, default=None, help="a checkpointed step (default: the latest)")
    p.add_argument("--output", required=True)
    p.set_defaults(run=to_torch)
    p = sub.add_parser("check", help="load a jina-clip directory and summarise it")
    p.add_argument("directory")
    p.set_defaults(run=check)
    return parser


def main(argv=None) -> int:
    from jclip_jax import distributed

    distributed.cpu_only_unless_accelerated()  # no TPU-probe noise on a CPU host
    args = build_parser().parse_args(argv)
    try:
        report = args.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"jclip-convert: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
