"""Evaluation throughput: images and captions embedded per second by jclip-eval's sharded embedder, so the
cost of a retrieval evaluation can be read off (MSCOCO 5k test: 5,000 images + 25,010 captions).

    python bench/eval.py --model tiny
    python bench/eval.py --model jina-clip-v1 --images 64 --captions 256 --batch-size 32

Images are 480x360 JPEGs (decoded, resized, centre-cropped and normalised in the embedder's thread pool, as
jclip-eval does with image files); captions are COCO-length sentences (tokenised per batch, padded to a token
bucket). Weights are random (speed does not depend on them). Compile time is reported apart; rates are from
a second, timed pass. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="model config: tiny | jina-clip-v1")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--captions", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=77)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--devices", type=int, default=0, help="virtual CPU devices (0: what jax finds)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.devices:  # before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}").strip()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import tempfile

    import jax
    import numpy as np
    from flax import nnx
    from PIL import Image

    from jclip_jax.data import synthetic
    from jclip_jax.evals.embedder import Embedder
    from jclip_jax.models import configs
    from jclip_jax.models.clip import JinaCLIP
    from jclip_jax.tokenizer import TextTokenizer

    cfg = configs.get(args.model)
    cfg.dtype = args.dtype
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:  # a WordPiece tokenizer of the synthetic vocabulary (no download)
        synthetic.write_tokenizer(os.path.join(tmp, "tok.json"), synthetic.vocabulary_texts())
        tokenizer = TextTokenizer(os.path.join(tmp, "tok.json"))
    t0 = time.perf_counter()
    model = JinaCLIP(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    embedder = Embedder(graphdef, batch_size=args.batch_size)
    state = embedder.replicate(state)
    init_s = time.perf_counter() - t0

    def jpeg(seed):  # smooth random colour fields: JPEG sizes like photos
        small = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((480, 360), Image.BICUBIC).save(buf, "JPEG", quality=90)
        return buf.getvalue()

    distinct = [jpeg(s) for s in range(16)]
    images = [distinct[i % len(distinct)] for i in range(args.images)]
    objects = [synthetic.OBJECTS[i] for i in rng.integers(len(synthetic.OBJECTS), size=args.captions)]
    captions = [synthetic.paraphrase(o, rng) + " on a plain background" for o in objects]

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        return time.perf_counter() - start

    size = cfg.vision.image_size
    image_pass = lambda: embedder.images(state, images, size)[0]
    text_pass = lambda: embedder.texts(state, tokenizer, captions, args.max_length)
    first = timed(image_pass) + timed(text_pass)  # compiles (one pixel shape, the caption buckets used)
    image_s, text_s = timed(image_pass), timed(text_pass)
    rates = {"images_per_s": args.images / image_s, "captions_per_s": args.captions / text_s}
    coco_s = 5000 / rates["images_per_s"] + 25010 / rates["captions_per_s"]
    result = {"model": args.model, "dtype": args.dtype, "devices": jax.device_count(),
              "platform": jax.devices()[0].platform, "batch_size": embedder.batch_size, "image_size": size,
              "init_s": round(init_s, 2), "compile_and_first_pass_s": round(first, 2),
              **{k: round(v, 2) for k, v in rates.items()}, "coco_5k_test_minutes": round(coco_s / 60, 2)}
    print(f"{args.model}: {rates['images_per_s']:.1f} images/s, {rates['captions_per_s']:.1f} captions/s on "
          f"{jax.device_count()} {result['platform']} device(s); MSCOCO 5k test ~ {coco_s / 60:.1f} min")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
