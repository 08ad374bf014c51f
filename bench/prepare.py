"""jclip-prepare throughput: records/s converting generated img2dataset-style webdataset tars with 1 and 2
worker processes, and the ratio.

Work per record: read it from the tar, decode the caption and its JSON, check-decode the JPEG (draft mode),
msgpack-encode, write to ArrayRecord; per tar (one unit), write and fsync-free rename its marker. Worker
start-up is included (it is part of a real run); use enough tars that it is small.

    python bench/prepare.py --tars 32 --per-tar 250 --json
    # last line: {"records_per_s_1": ..., "records_per_s_2": ..., "ratio": ..., "loadavg_before": [...]}

The machine's 1-minute load average before each run is printed: the ratio only means something when the
other cores are idle. CPU-ms per record (this process + its workers) shows whether the workers add work:
equal figures mean the wall-time ratio is bounded only by the cores free.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image


def write_tars(directory: str, tars: int, per_tar: int, size: int, seed: int = 0) -> str:
    """Photo-like JPEGs (smooth noise, about img2dataset's 256 px), .txt captions, .json metadata."""
    rng = np.random.default_rng(seed)
    base = [np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).resize((size, size),
                                                                                      Image.BICUBIC))
            for _ in range(16)]
    for t in range(tars):
        with tarfile.open(os.path.join(directory, f"{t:05d}.tar"), "w") as tar:
            for i in range(per_tar):
                key = f"{t:05d}{i:04d}"
                noise = rng.integers(-12, 13, (size, size, 3))
                pixels = np.clip(base[(t + i) % 16].astype(int) + noise, 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, "JPEG", quality=90)
                caption = f"a photo number {i} of shard {t}"
                meta = {"key": key, "url": f"https://example.com/{key}.jpg", "caption": caption, "status": "success"}
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(directory, "*.tar")


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the workers, once their pool is joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_prepare(inputs: str, output: str, workers: int) -> tuple[float, int, float]:
    """(wall seconds, records written, CPU seconds of this process and its workers)."""
    from jclip_jax.data import prepare

    cpu = _cpu_seconds()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the summary line
        summary = prepare.run(["image-text", "--format", "webdataset", "--input", inputs, "--output", output,
                           "--workers", str(workers)])
    return time.perf_counter() - start, summary["written"], _cpu_seconds() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tars", type=int, default=32)
    parser.add_argument("--per-tar", type=int, default=250)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs per worker count")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        inputs = write_tars(tmp, args.tars, args.per_tar, args.image_size)
        out, loads, cpu_ms = {}, {}, {}
        for workers in (1, 2):
            best = 0.0
            for r in range(args.repeats):
                loads.setdefault(workers, []).append(round(os.getloadavg()[0], 2))
                seconds, written, cpu = time_prepare(inputs, os.path.join(tmp, f"out-{workers}-{r}"), workers)
                best = max(best, written / seconds)
                cpu_ms[workers] = round(1000 * cpu / written, 3)
            out[workers] = best
            print(f"workers={workers}: {best:,.0f} records/s, {cpu_ms[workers]} CPU-ms/record  (load average "
                  f"before: {loads[workers]}, {os.cpu_count()} cores)", flush=True)
        ratio = out[2] / out[1]
        print(f"2 workers / 1 worker: {ratio:.2f}x")
        if args.json:
            print(json.dumps({"records_per_s_1": round(out[1], 1), "records_per_s_2": round(out[2], 1),
                              "ratio": round(ratio, 3), "cpu_ms_per_record": cpu_ms, "loadavg_before": loads,
                              "cores": os.cpu_count(), "records": args.tars * args.per_tar}))


if __name__ == "__main__":
    main()
