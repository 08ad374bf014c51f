"""`jclip-prepare`: converts what users have into the training format (records.py).

    jclip-prepare image-text --format webdataset --input 'shards/*.tar' --output DIR [--workers 8]
    jclip-prepare image-text --format folder --input captions.csv [--image-root IMAGES] --output DIR
    jclip-prepare image-text --format coco --input dataset_flickr30k.json --image-root IMAGES \
        --split test --output DIR
    jclip-prepare text-pairs --input 'pairs/*.jsonl' --output DIR      # {"query", "positive", "dataset"}
    jclip-prepare triplets --input 'triplets/*.jsonl' --output DIR     # ... + "negatives": [7 strings]
    jclip-prepare synthetic --output DIR                               # the embedded demo / test dataset
    jclip-prepare finalize DIR                                         # manifest of a sharded run

Scale: `--workers N` converts with N processes; `--num-shards S --shard-index I` converts the I-th of S
disjoint parts of the inputs (one per machine) into the same --output; the part that completes the last
unit writes the manifest (or run `finalize`). Rerunning a command skips finished units (verified) and
redoes partial ones. Inputs and --output may be gs:// paths. See data/parts.py.

webdataset is img2dataset's output: KEY.jpg + KEY.txt and/or KEY.json ({"caption", "key", "url"}).
--min-image-size skips small images; --resize-shorter-side S re-encodes larger ones (JPEG) at S.

Bad inputs are skipped and counted by reason, never fatal; the last line printed (stdout) is the JSON summary
{"written": N, "skipped": {"reason": count}}. Skip details (file:line) go to stderr with --verbose. Unusable
inputs (no file matches, a table without the named columns, an empty or non-tar .tar) stop with a one-line
error and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tqdm import tqdm

from jclip_jax.data import parts, sources, synthetic


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jclip-prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub, needs_input=True):
        if needs_input:
            sub.add_argument("--input", required=True, nargs="+", help="input files or glob patterns")
        sub.add_argument("--output", required=True,
                         help="output directory (must not hold a prepared dataset)")
        sub.add_argument("--records-per-shard", type=int, default=5000)
        sub.add_argument("--verbose", action="store_true", help="print every skipped item to stderr")
        if needs_input:
            sub.add_argument("--workers", type=int, default=1, help="conversion processes on this machine")
            sub.add_argument("--num-shards", type=int, default=1, help="machines sharing the inputs")
            sub.add_argument("--shard-index", type=int, default=0, help="this machine's part, in [0, S)")
            sub.add_argument("--rows-per-unit", type=int, default=10_000,
                             help="table rows per unit of work (a tar is always one unit)")

    image_text = commands.add_parser("image-text", help="image-caption pairs")
    common(image_text)
    image_text.add_argument("--format", required=True, choices=("webdataset", "folder", "coco"))
    image_text.add_argument("--image-root", help="folder/coco: directory the image paths are relative to")
    image_text.add_argument("--file-column", default="file", help="folder: column with the image path")
    image_text.add_argument("--caption-column", default="caption", help="folder: column with the caption")
    image_text.add_argument("--split", help="coco (Karpathy split file): train, val, test or restval")
    image_text.add_argument("--dataset", default="default", help="dataset name the records are filed under")
    image_text.add_argument("--min-image-size", type=int, default=0,
                            help="skip images whose shorter side is smaller (0: keep all)")
    image_text.add_argument("--resize-shorter-side", type=int, default=0,
                            help="re-encode images whose shorter side is larger at this size (0: off)")

    for name, help_text in (("text-pairs", 'JSONL {"query", "positive", "dataset"}'),
                            ("triplets", 'JSONL {"query", "positive", "negatives": [7], "dataset"}')):
        sub = commands.add_parser(name, help=help_text)
        common(sub)
        sub.add_argument("--dataset", default="default", help='name for lines without a "dataset" field')

    synth = commands.add_parser("synthetic", help="procedural shapes + captions, text pairs, triplets")
    common(synth, needs_input=False)
    synth.add_argument("--num-train", type=int, default=5000)
    synth.add_argument("--num-eval", type=int, default=len(synthetic.OBJECTS))
    synth.add_argument("--num-text-pairs", type=int, default=5000, help="per text-pair dataset")
    synth.add_argument("--num-triplets", type=int, default=2000)
    synth.add_argument("--image-size", type=int, default=64)
    synth.add_argument("--seed", type=int, default=0)

    fin = commands.add_parser("finalize", help="write the manifest once every part of a sharded run is done")
    fin.add_argument("output", help="the --output directory of the parts")
    return parser


def _convert(args) -> dict:
    if args.command == "image-text":
        if args.format == "coco" and not args.image_root:
            raise SystemExit("--format coco needs --image-root (the directory of the images)")
        for flag in ("min_image_size", "resize_shorter_side"):
            if getattr(args, flag) < 0:
                raise SystemExit(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
        kind = "image_text"
        spec = sources.SourceSpec(args.format, image_root=args.image_root, file_column=args.file_column,
                                  caption_column=args.caption_column, split=args.split,
                                  default_dataset=args.dataset,
                                  image=sources.ImageOptions(args.min_image_size, args.resize_shorter_side))
    else:
        kind = "text_pair" if args.command == "text-pairs" else "triplet"
        spec = sources.SourceSpec(kind, default_dataset=args.dataset)
    if args.rows_per_unit < 1 or args.records_per_shard < 1:
        raise SystemExit("--rows-per-unit and --records-per-shard must be >= 1")
    output = args.output if "://" in args.output else os.path.abspath(args.output)
    inputs = [p if "://" in p else os.path.abspath(p) for p in sources.expand_inputs(args.input)]
    units = sources.plan_units(spec, inputs, args.rows_per_unit)  # every input checked before OUT is made
    return parts.run(output, kind, spec, units, records_per_shard=args.records_per_shard,
                     rows_per_unit=args.rows_per_unit, workers=args.workers, num_shards=args.num_shards,
                     shard_index=args.shard_index, verbose=args.verbose)


def run(argv: list[str] | None = None) -> dict:
    """Parses `argv`, converts, prints the JSON summary as the last line and returns it."""
    args = _parser().parse_args(argv)
    if args.command == "synthetic":
        summaries = synthetic.write_synthetic(
            args.output, num_train=args.num_train, num_eval=args.num_eval, num_text_pairs=args.num_text_pairs,
            num_triplets=args.num_triplets, image_size=args.image_size, seed=args.seed,
            progress=lambda it, total, desc: tqdm(it, total=total, desc=desc, file=sys.stderr))
        for split, summary in summaries.items():
            print(f"{split}: {json.dumps(summary)}", file=sys.stderr)
        summary = {"written": sum(s["written"] for s in summaries.values()), "skipped": {}}
    elif args.command == "finalize":
        summary = parts.finalize(args.output)
    else:
        summary = _convert(args)
    print(json.dumps(summary), flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    """Console entry point (returns None: a returned dict would become the exit status)."""
    try:
        run(argv)
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # InputError, PrepareError included
        raise SystemExit(f"jclip-prepare: error: {e}") from e


if __name__ == "__main__":
    main()
