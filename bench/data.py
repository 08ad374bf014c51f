"""Input-pipeline throughput: images/s through the grain pipeline next to a bare PIL loop doing the same work.

Work per image, both ways: read the record from ArrayRecord, msgpack-decode it, decode the 384x384 JPEG,
RandomResizedCrop (or the eval resize + centre crop with --eval-crop) to 224, CLIP-normalise, tokenise the
caption, stack into batches. The pipeline runs it in grain worker processes; the bare loop in this process.

    python bench/data.py --json     # last line: {"pipeline_img_per_s": ..., "bare_pil_img_per_s": ...}

Also prints the pipeline with 1 and 2 workers (scaling). Worker start-up is excluded (a warm-up batch).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image


def _cpu_seconds() -> float:
    """CPU time of this process and its live children (grain workers); needs psutil, else NaN."""
    try:
        import psutil
    except ImportError:
        return float("nan")
    total = 0.0
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:  # a child that exited meanwhile
            pass
    return total


def make_dataset(directory: str, num_images: int, size: int = 384) -> None:
    """JPEGs of smooth random colour fields + noise (compress like photos, not like flat test patterns)."""
    from jclip_jax.data import records, synthetic

    rng = np.random.default_rng(0)
    with records.RecordWriter(os.path.join(directory, "images"), "image_text") as writer:
        for i in range(num_images):
            coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            img = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
            pixels = np.asarray(img, np.int16) + rng.integers(-12, 13, (size, size, 3))
            buf = io.BytesIO()
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
            scene = [synthetic.OBJECTS[i % len(synthetic.OBJECTS)]]
            writer.write({"key": str(i), "image": buf.getvalue(), "captions": [synthetic.caption(scene)]})
    synthetic.write_tokenizer(os.path.join(directory, "tokenizer.json"), synthetic.vocabulary_texts())


def bare_pil(directory: str, num_images: int, batch_size: int, image_size: int,
             eval_crop: bool) -> tuple[float, float]:
    """The same work as the pipeline, as a plain loop over the records. Returns (images/s, images/CPU-s)."""
    from array_record.python.array_record_module import ArrayRecordReader

    from jclip_jax import preprocess
    from jclip_jax.data import records
    from jclip_jax.tokenizer import TextTokenizer

    manifest = records.read_manifest(os.path.join(directory, "images"))
    paths = [p for entry in manifest["datasets"].values() for p in entry["paths"]]
    readers = [ArrayRecordReader(p, "readahead_buffer_size:0") for p in paths]
    tokenizer = TextTokenizer(os.path.join(directory, "tokenizer.json"))
    rng = np.random.default_rng(0)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    done, images, texts = 0, [], []
    while done < num_images:
        for reader in readers:
            for i in range(reader.num_records()):
                record = records.decode(reader.read([i])[0])
                with Image.open(io.BytesIO(record["image"])) as img:
                    img = img.convert("RGB")
                if eval_crop:
                    img = preprocess.center_crop(preprocess.resize_shortest_side(img, image_size), image_size)
                else:
                    img = preprocess.random_resized_crop(img, image_size, rng, (0.9, 1.0))
                images.append(preprocess.normalize(np.asarray(img, np.uint8)))
                texts.append(tokenizer(record["captions"][:1], 77, buckets=None)[0])
                if len(images) == batch_size:
                    np.stack(images), np.stack(texts)
                    images, texts = [], []
                done += 1
                if done == num_images:
                    break
            if done == num_images:
                break
    return num_images / (time.perf_counter() - start), num_images / (_cpu_seconds() - cpu_start)


def pipeline(directory: str, num_images: int, batch_size: int, image_size: int, eval_crop: bool,
             workers: int) -> tuple[float, float]:
    """grain pipeline with `workers` processes. Returns (images/s, images per CPU-second of all processes)."""
    from jclip_jax.data import pipeline as data_pipeline

    # read_threads=1: one core per worker, so "per core" compares like with like.
    config = data_pipeline.DataConfig(
        image_text_dir=os.path.join(directory, "images"),
        tokenizer_path=os.path.join(directory, "tokenizer.json"),
        image_batch_size=batch_size, image_size=image_size, random_crop=not eval_crop, read_threads=1)
    ds = data_pipeline.image_text_dataset(config, share=(0, 1))
    ds = data_pipeline.with_workers(ds, workers, buffer_size=4)
    it = iter(ds)
    for _ in range(max(workers, 1)):  # warm-up: worker start-up and first batches are not throughput
        next(it)
    num_batches = num_images // batch_size
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    for _ in range(num_batches):
        next(it)
    seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start
    it.close()
    return num_batches * batch_size / seconds, num_batches * batch_size / cpu_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="end with the JSON summary line")
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--eval-crop", action="store_true",
                        help="resize + centre crop instead of RandomResizedCrop")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        make_dataset(directory, args.num_images)
        work = (directory, args.num_images, args.batch_size, args.image_size, args.eval_crop)
        bare = bare_pil(*work)
        per_workers = {n: pipeline(*work, workers=n) for n in (1, 2)}
    print(f"cores: {os.cpu_count()}, crop: {'eval' if args.eval_crop else 'random-resized'}, "
          f"{args.num_images} images 384x384 JPEG -> {args.image_size}")
    print(f"bare PIL loop (1 process):  {bare[0]:7.1f} img/s  {bare[1]:7.1f} img/CPU-s")
    for n, (rate, per_cpu) in per_workers.items():
        print(f"pipeline, {n} worker(s):     {rate:7.1f} img/s  {per_cpu:7.1f} img/CPU-s  "
              f"({rate / bare[0]:.2f}x bare, {rate / per_workers[1][0]:.2f}x 1 worker)")
    if args.json:
        print(json.dumps({"pipeline_img_per_s": round(per_workers[1][0], 1),
                          "bare_pil_img_per_s": round(bare[0], 1),
                          "pipeline_img_per_cpu_s": round(per_workers[1][1], 1),
                          "bare_pil_img_per_cpu_s": round(bare[1], 1),
                          "pipeline_2_workers_img_per_s": round(per_workers[2][0], 1),
                          "cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
