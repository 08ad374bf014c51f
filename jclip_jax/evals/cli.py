"""jclip-eval: the paper's evaluations of any checkpoint on local data.

  jclip-eval --checkpoint PATH --task image_text --data dataset_coco.json --images coco/ --split test
  jclip-eval --checkpoint PATH --task image_text --data data/eval/flickr30k_test     (jclip-prepare'd)
  jclip-eval --checkpoint PATH --task zeroshot --data imagenet/val --classnames names.txt [--templates T]
  jclip-eval --checkpoint PATH --task beir --data scifact/ --split test
  jclip-eval --checkpoint PATH --task sts --data sts-test.tsv
  ... --truncate-dims 64,128,256 --plot sweep.png --output results.json

PATH is a training workdir (its latest checkpoint, or --step) or a jina-clip HF directory. Every metric is
reported at the full dimension and at each --truncate-dims (Matryoshka: keep the first k dims, then
normalise), from one pass of embedding. Embeddings run in fixed-shape batches over all devices.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

COUNT_KEYS = ("images", "captions", "classes", "queries", "documents", "pairs", "skipped_records",
              "decode_failures", "qrels_unknown_documents", "queries_without_relevant")


def dim_label(dim: int | None) -> str:
    return "full" if dim is None else str(dim)


def parse_dims(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        dims = [int(d) for d in text.split(",") if d.strip()]
    except ValueError as e:
        raise ValueError(f"--truncate-dims={text!r}: expected comma-separated integers, e.g. 64,128,256") from e
    if any(d <= 0 for d in dims):
        raise ValueError(f"--truncate-dims={text!r}: dimensions must be positive")
    return sorted(set(dims))


def format_table(results: dict[str, dict[str, float]]) -> str:
    """{dim label: {metric: value}} -> rows of metrics, a column per dim; counts listed once below."""
    labels = list(results)
    first = results[labels[0]]
    metric_names = [k for k in first if k not in COUNT_KEYS]
    width = max([len(m) for m in metric_names] + [6])
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{label:>8}" for label in labels)]
    for m in metric_names:
        lines.append(f"{m:<{width}}  " + "  ".join(f"{results[label][m]:8.4f}" for label in labels))
    counts = {k: first[k] for k in COUNT_KEYS if k in first}
    lines.append("counts: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return "\n".join(lines)


def plot_sweep(results: dict[str, dict[str, float]], embed_dim: int, path: str, title: str) -> None:
    """Each metric against the embedding dimension (log2 axis), one line per metric, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = {label: embed_dim if label == "full" else int(label) for label in results}
    order = sorted(dims, key=dims.get)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in (k for k in results[order[0]] if k not in COUNT_KEYS and k != "chance_r1"):
        ax.plot([dims[label] for label in order], [results[label][m] for label in order], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xticks([dims[label] for label in order], [str(dims[label]) for label in order])
    ax.set_xlabel("embedding dimension (Matryoshka truncation)")
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    from jclip_jax.evals.tasks import TASK_TYPES

    p = argparse.ArgumentParser(prog="jclip-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training workdir or jina-clip HF directory")
    p.add_argument("--step", type=int, help="workdir: a checkpointed step (default: the latest)")
    p.add_argument("--tokenizer", help="tokenizer.json / .model (default: the checkpoint's)")
    p.add_argument("--task", required=True, choices=TASK_TYPES)
    p.add_argument("--data", required=True, help="the task's data (see above)")
    p.add_argument("--images", help="image_text: the image folder of a Karpathy/COCO JSON")
    p.add_argument("--split", help="image_text (Karpathy): test (default), val, ...; beir: qrels/<split>.tsv")
    p.add_argument("--classnames", help="zeroshot: one name per class folder (sorted order) or folder<TAB>name")
    p.add_argument("--templates", help="zeroshot: prompt templates with {c} (default: the shipped set)")
    p.add_argument("--query-prefix", help="beir: text put before each query (e.g. a task prompt)")
    p.add_argument("--document-prefix", help="beir: text put before each document")
    p.add_argument("--prefix", help="sts: text put before each sentence")
    p.add_argument("--truncate-dims", help="Matryoshka sweep, e.g. 64,128,256,512")
    p.add_argument("--plot", help="with --truncate-dims: write a PNG of each metric against the dimension")
    p.add_argument("--batch-size", type=int, default=64, help="rows per batch (rounded up to the device count)")
    p.add_argument("--max-length", type=int, help="text tokens (default: the model's max_length)")
    p.add_argument("--output", help="write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def spec_from_args(args) -> dict:
    return {"type": args.task, "data": args.data, "images": args.images, "split": args.split,
            "classnames": args.classnames, "templates": args.templates, "query_prefix": args.query_prefix,
            "document_prefix": args.document_prefix, "prefix": args.prefix}


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse, check, load, evaluate; prints the table and returns the results dict."""
    from jclip_jax.evals import tasks

    args = build_parser().parse_args(argv)
    dims = parse_dims(args.truncate_dims)
    if args.plot and not dims:
        raise ValueError("--plot needs --truncate-dims (a plot of one point says nothing)")
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size={args.batch_size} must be positive")
    spec = {k: v for k, v in spec_from_args(args).items() if v is not None}
    spec = tasks.check_spec(spec, where="jclip-eval")  # before loading any weights

    from flax import nnx

    from jclip_jax.evals.embedder import Embedder
    from jclip_jax.loading import load_model

    model = load_model(args.checkpoint, step=args.step, tokenizer=args.tokenizer)
    too_big = [d for d in dims if d > model.embed_dim]
    if too_big:
        raise ValueError(f"--truncate-dims {too_big} exceed the model's embedding dimension {model.embed_dim}")
    data = tasks.load(spec, where="jclip-eval")
    graphdef, state = nnx.split(model)
    embedder = Embedder(graphdef, batch_size=args.batch_size, progress=not args.no_progress)
    state = embedder.replicate(state)
    ctx = tasks.Context(embedder, model.tokenizer, model.cfg.vision.image_size,
                        args.max_length or model.cfg.text.max_length)
    out = tasks.evaluate(data, ctx, state, [None, *dims])
    results = {dim_label(d): v for d, v in out.items()}
    report = {"checkpoint": args.checkpoint, "task": spec, "embed_dim": int(model.embed_dim), "results": results}
    if embedder.decode_failures:
        report["decode_failure_examples"] = embedder.decode_failures[:5]
    print(f"jclip-eval: {args.task} on {args.data} ({args.checkpoint})")
    print(format_table(results))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2, default=lambda x: x.item() if isinstance(x, np.generic) else str(x))
        print(f"wrote {args.output}")
    if args.plot:
        plot_sweep(results, model.embed_dim, args.plot, f"{args.task}: {os.path.basename(args.data.rstrip('/'))}")
        print(f"wrote {args.plot}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    from jclip_jax import distributed

    distributed.cpu_only_unless_accelerated()  # no TPU-probe noise on a CPU host
    try:
        run(argv)
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("JCLIP_DEBUG"):
            raise
        print(f"jclip-eval: {e}  (JCLIP_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
