"""`jclip-prepare`: converts what users have into the training format (records.py).

    jclip-prepare image-text --format webdataset --input 'shards/*.tar' --output DIR
    jclip-prepare image-text --format folder --input captions.csv [--image-root IMAGES] --output DIR
    jclip-prepare image-text --format coco --input dataset_flickr30k.json --image-root IMAGES \
        --split test --output DIR
    jclip-prepare text-pairs --input 'pairs/*.jsonl' --output DIR      # {"query", "positive", "dataset"}
    jclip-prepare triplets --input 'triplets/*.jsonl' --output DIR     # ... + "negatives": [7 strings]
    jclip-prepare synthetic --output DIR                               # the embedded demo / test dataset

Bad inputs are skipped and counted by reason, never fatal; the last line printed (stdout) is the JSON summary
{"written": N, "skipped": {"reason": count}}. Skip details go to stderr with --verbose.
"""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from jclip_jax.data import records, sources, synthetic


def _convert(stream, output: str, kind: str, records_per_shard: int, verbose: bool, dataset: str) -> dict:
    with records.RecordWriter(output, kind, records_per_shard) as writer:
        bar = tqdm(stream, desc=f"{kind} -> {output}", unit=" records", file=sys.stderr)
        for item in bar:
            if isinstance(item, sources.Skip):
                writer.skip(item.reason)
                if verbose:
                    tqdm.write(f"skipped ({item.reason}): {item.detail}", file=sys.stderr)
            else:
                writer.write(item, dataset=dataset)
            bar.set_postfix(written=writer.written, skipped=sum(writer.skipped.values()), refresh=False)
    return writer.close()


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

    image_text = commands.add_parser("image-text", help="image-caption pairs")
    common(image_text)
    image_text.add_argument("--format", required=True, choices=("webdataset", "folder", "coco"))
    image_text.add_argument("--image-root", help="folder/coco: directory the image paths are relative to")
    image_text.add_argument("--file-column", default="file", help="folder: column with the image path")
    image_text.add_argument("--caption-column", default="caption", help="folder: column with the caption")
    image_text.add_argument("--split", help="coco (Karpathy split file): train, val, test or restval")
    image_text.add_argument("--dataset", default="default", help="dataset name the records are filed under")

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
    return parser


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
    else:
        if args.command == "image-text":
            if args.format == "webdataset":
                stream = sources.iter_webdataset(args.input)
            elif len(args.input) != 1:
                raise SystemExit(f"--format {args.format} takes one --input file, got {args.input}")
            elif args.format == "folder":
                stream = sources.iter_folder(args.input[0], args.image_root, args.file_column,
                                             args.caption_column)
            else:
                if not args.image_root:
                    raise SystemExit("--format coco needs --image-root (the directory of the images)")
                stream = sources.iter_coco(args.input[0], args.image_root, args.split)
            kind = "image_text"
        else:
            kind = "text_pair" if args.command == "text-pairs" else "triplet"
            stream = sources.iter_text_jsonl(args.input, kind, default_dataset=args.dataset)
        summary = _convert(stream, args.output, kind, args.records_per_shard, args.verbose, args.dataset)
    print(json.dumps(summary), flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    """Console entry point (returns None: a returned dict would become the exit status)."""
    try:
        run(argv)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise SystemExit(f"jclip-prepare: error: {e}") from e


if __name__ == "__main__":
    main()
