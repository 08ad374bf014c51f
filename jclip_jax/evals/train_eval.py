"""Evaluation during training (config.evals), with jclip-eval's tasks and embedding code.

    config.evals.image_text_dir   a prepared image-text set: image<->text R@1/5/10 (keys as before:
                                  image_to_text_r1, ..., chance_r1, eval_decode_failures)
    config.evals.text_pairs_dir   prepared text pairs: text->text R@k (text_to_text_r1, ...,
                                  eval_text_pairs_skipped_records: damaged records skipped)
    config.evals.tasks            {name: task spec} of any jclip-eval task type (evals/tasks.py), reported
                                  as "<name>/<metric>", e.g. tasks.coco = dict(type="image_text",
                                  data="dataset_coco.json", images="coco/", split="val")

Sets are read once; every call embeds them with the current params in fixed-shape batches sharded over
the training mesh.
"""

from __future__ import annotations

from jclip_jax.data import records
from jclip_jax.evals import metrics, tasks
from jclip_jax.evals.embedder import Embedder
from jclip_jax.inference import normalize_rows
from jclip_jax.tokenizer import TextTokenizer


def read_text_pairs(directory: str) -> tuple[list[str], list[str], int]:
    """(queries, positives, damaged records skipped) of a prepared text_pair directory."""
    import grain

    manifest = records.read_manifest(directory, kind="text_pair")
    paths = [p for entry in manifest["datasets"].values() for p in entry["paths"]]
    queries, positives, skipped = [], [], 0
    for data in grain.sources.ArrayRecordDataSource(paths):
        try:
            row = records.decode(data)
            query, positive = str(row["query"]), str(row["positive"])
        except (ValueError, KeyError, TypeError):  # msgpack's and the schema's errors are ValueErrors
            skipped += 1
            continue
        queries.append(query)
        positives.append(positive)
    return queries, positives, skipped


def task_specs(config) -> dict[str, dict]:
    """config.evals.tasks checked (type, keys, paths): raises naming config.evals.tasks.<name>."""
    specs = config.evals.get("tasks") or {}
    return {name: tasks.check_spec(spec.to_dict() if hasattr(spec, "to_dict") else dict(spec),
                                   where=f"config.evals.tasks.{name}") for name, spec in specs.items()}


class Evaluator:
    """Loads the held-out sets once; `evaluator(params)` -> {metric: value} (empty without eval sets)."""

    def __init__(self, config, graphdef, mesh=None, batch_axes=None, eval_tasks: dict | None = None):
        """eval_tasks: config.evals.tasks as the config's validation checked them (None: checked here)."""
        self.embedder = Embedder(graphdef, mesh, config.evals.batch_size, batch_axes=batch_axes)
        tokenizer = TextTokenizer(config.data.tokenizer_path)
        size = config.model.vision.image_size
        # captions are tokenised as in training's image-text batches, text tasks as its text batches
        self.image_ctx = tasks.Context(self.embedder, tokenizer, size, config.data.image_max_length)
        self.text_ctx = tasks.Context(self.embedder, tokenizer, size, config.data.text_max_length)
        self.sets = {}
        if config.evals.image_text_dir:
            self.sets[""] = tasks.load({"type": "image_text", "data": config.evals.image_text_dir},
                                       where="config.evals.image_text_dir")
        specs = task_specs(config) if eval_tasks is None else eval_tasks
        for name, spec in specs.items():
            self.sets[name] = tasks.load(spec, where=f"config.evals.tasks.{name}")
        self.text_pairs = read_text_pairs(config.evals.text_pairs_dir) if config.evals.text_pairs_dir else None

    def __call__(self, params) -> dict[str, float]:
        results = {}
        for name, data in self.sets.items():
            ctx = self.image_ctx if data["type"] in ("image_text", "zeroshot") else self.text_ctx
            out = tasks.evaluate(data, ctx, params)[None]
            if name:
                results.update({f"{name}/{k}": v for k, v in out.items()})
            else:  # the default set keeps the trainer's original keys
                results.update({k: out[k] for k in out if k.startswith(("image_to_text", "text_to_image", "chance"))})
                results["eval_decode_failures"] = int(out["decode_failures"] + out["skipped_records"])
        if self.text_pairs is not None:
            ctx = self.text_ctx
            queries, positives, skipped = self.text_pairs
            q = self.embedder.texts(params, ctx.tokenizer, queries, ctx.max_length)
            p = self.embedder.texts(params, ctx.tokenizer, positives, ctx.max_length)
            results.update(metrics.text_pair_retrieval(normalize_rows(q), normalize_rows(p)))
            results["eval_text_pairs_skipped_records"] = skipped
        return results
