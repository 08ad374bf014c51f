"""The harness adapters, run through the harnesses' own evaluation code on tiny data defined here (no hub):
mteb 2.x (a retrieval and an STS task defined locally) and clip_benchmark (zeroshot_retrieval and
zeroshot_classification .evaluate), each checked against jclip-eval on the same data."""

import json

import numpy as np
import pytest
import torch
from flax import nnx
from torch_compat import import_open_clip

from jclip_jax import JinaCLIP
from jclip_jax.data import synthetic
from jclip_jax.evals import cli
from jclip_jax.models import configs
from jclip_jax.tokenizer import TextTokenizer

COLOURS = ("blue", "cyan", "green", "red", "yellow", "purple")
DOCS = ["a small red circle in the top left", "a large blue square in the bottom right",
        "the quick brown fox", "a green triangle at the top", "a purple circle", "two yellow stars"]
QUERIES = {"q0": "red disc", "q1": "blue box at the bottom", "q2": "fox", "q3": "a star that is yellow"}
QRELS = {"q0": {"d0": 1, "d4": 2}, "q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d5": 1, "d3": 0}}
STS = [("a red circle", "a red disc", 5.0), ("a red circle", "a blue square", 0.5),
       ("a small box", "a tiny block", 4.0), ("a green wedge", "green triangle", 3.5),
       ("the fox", "a purple circle", 0.0), ("a big star", "a huge star", 4.5)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny model in the HF layout; a BEIR directory; an STS file; captioned images; class folders."""
    import_open_clip()  # mteb (via transformers) and clip_benchmark import torchvision: see torch_compat
    root = tmp_path_factory.mktemp("harness")
    tok = root / "tokenizer.json"
    synthetic.write_tokenizer(tok, synthetic.vocabulary_texts())
    JinaCLIP(configs.tiny(), rngs=nnx.Rngs(5), tokenizer=TextTokenizer(tok)).save_pretrained(root / "hf")
    (root / "beir" / "qrels").mkdir(parents=True)
    (root / "beir" / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": d}) + "\n"
                                                        for i, d in enumerate(DOCS)))
    (root / "beir" / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n"
                                                         for q, t in QUERIES.items()))
    (root / "beir" / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{g}\n" for q, rel in QRELS.items() for d, g in rel.items()))
    (root / "sts.tsv").write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in STS))
    rng = np.random.default_rng(1)
    (root / "images").mkdir()
    entries = []
    for i, colour in enumerate(COLOURS):
        obj = ("large", colour, synthetic.SHAPES[i % 3], "top left")
        img = synthetic.render([obj], 40, rng)
        img.save(root / "images" / f"{i}.png")
        (root / "classes" / colour).mkdir(parents=True)
        img.save(root / "classes" / colour / "0.png")
        other = synthetic.render([("small", colour, "square", "bottom right")], 40, rng)
        other.save(root / "classes" / colour / "1.png")
        sentences = [synthetic.caption([obj])] + [synthetic.paraphrase(obj, rng) for _ in range(2)]
        entries.append({"filename": f"{i}.png", "split": "test", "sentences": [{"raw": s} for s in sentences]})
    (root / "karpathy.json").write_text(json.dumps({"images": entries}))
    return root


def jclip_eval(root, *args):
    return cli.run(["--checkpoint", str(root / "hf"), "--no-progress", *args])["results"]["full"]


# -------------------------------------------------------------------------------------------------- mteb


def mteb_tasks():
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata

    meta = dict(description="local test task", reference="https://example.org",
                dataset={"path": "NA", "revision": "NA"},
                category="t2t", eval_splits=["test"], eval_langs=["eng-Latn"], date=("2024-01-01", "2024-01-01"),
                dialect=["Written"], domains=[], task_subtypes=[], license="cc-by-4.0", annotations_creators="derived",
                modalities=["text"], sample_creation="found", bibtex_citation="")

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(type="Retrieval", name="JclipLocalRetrieval", main_score="ndcg_at_10", **meta)

        def load_data(self, num_proc=None, **kwargs):
            split = RetrievalSplitData(
                queries=Dataset.from_list([{"id": q, "text": t} for q, t in QUERIES.items()]),
                corpus=Dataset.from_list([{"id": f"d{i}", "text": d} for i, d in enumerate(DOCS)]),
                relevant_docs=QRELS, top_ranked=None)
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    class LocalSTS(AbsTaskSTS):
        metadata = TaskMetadata(type="STS", name="JclipLocalSTS", main_score="cosine_spearman", **meta)

        def load_data(self, num_proc=None, **kwargs):
            a, b, s = zip(*STS, strict=True)
            self.dataset = DatasetDict({"test": Dataset.from_dict({"sentence1": a, "sentence2": b, "score": s})})
            self.data_loaded = True

    return LocalRetrieval(), LocalSTS()


def test_mteb_runs_our_encoder(data):
    import mteb

    from jclip_jax.evals.mteb_adapter import MtebEncoder

    retrieval, sts = mteb_tasks()
    result = mteb.evaluate(MtebEncoder(str(data / "hf")), [retrieval, sts], cache=None, show_progress_bar=False)
    scores = {r.task_name: r.scores["test"][0] for r in result.task_results}
    ours = jclip_eval(data, "--task", "beir", "--data", str(data / "beir"))
    got = scores["JclipLocalRetrieval"]
    assert got["ndcg_at_10"] == pytest.approx(ours["ndcg@10"], abs=1e-5)
    assert got["mrr_at_10"] == pytest.approx(ours["mrr@10"], abs=1e-5)
    assert got["recall_at_100"] == pytest.approx(ours["recall@100"], abs=1e-5)
    ours = jclip_eval(data, "--task", "sts", "--data", str(data / "sts.tsv"))
    assert scores["JclipLocalSTS"]["cosine_spearman"] == pytest.approx(ours["spearman"], abs=1e-5)


# ---------------------------------------------------------------------------------------- clip_benchmark


class Captioned(torch.utils.data.Dataset):
    def __init__(self, root, transform):
        self.entries = json.loads((root / "karpathy.json").read_text())["images"]
        self.root, self.transform = root, transform

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        from PIL import Image

        e = self.entries[i]
        return self.transform(Image.open(self.root / "images" / e["filename"])), [s["raw"] for s in e["sentences"]]


class Folders(torch.utils.data.Dataset):
    def __init__(self, root, transform):
        self.classes = sorted(p.name for p in (root / "classes").iterdir())
        self.items = [(p, c) for c, name in enumerate(self.classes)
                      for p in sorted((root / "classes" / name).iterdir())]
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.open(self.items[i][0])), self.items[i][1]


def test_clip_benchmark_runs_our_model(data, monkeypatch):
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    from jclip_jax.evals.clip_benchmark_adapter import load_jclip, register

    model, transform, tokenizer = load_jclip(str(data / "hf"))
    loader = torch.utils.data.DataLoader(Captioned(data, transform), batch_size=4,
                                         collate_fn=lambda b: (torch.stack([x[0] for x in b]), [x[1] for x in b]))
    got = zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5])
    ours = jclip_eval(data, "--task", "image_text", "--data", str(data / "karpathy.json"), "--images",
                      str(data / "images"))
    for k in (1, 5):
        assert got[f"image_retrieval_recall@{k}"] == pytest.approx(ours[f"text_to_image_r{k}"])
        assert got[f"text_retrieval_recall@{k}"] == pytest.approx(ours[f"image_to_text_r{k}"])

    # clip_benchmark 1.6.2's accuracy() calls float() on a 1-element array, which numpy >= 2.4 refuses; the
    # same computation with .item() (its topk logic unchanged) lets the rest of its evaluate() run as is.
    def accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]

    monkeypatch.setattr(zeroshot_classification, "accuracy", accuracy)
    templates = ["a photo of a {c}.", "a {c} shape"]
    (data / "templates.txt").write_text("\n".join(templates))
    folders = Folders(data, transform)
    got = zeroshot_classification.evaluate(model, torch.utils.data.DataLoader(folders, batch_size=5), tokenizer,
                                           folders.classes, templates, "cpu", amp=False)
    ours = jclip_eval(data, "--task", "zeroshot", "--data", str(data / "classes"), "--templates",
                      str(data / "templates.txt"))
    assert got["acc1"] == pytest.approx(ours["top1"])
    assert got["acc5"] == pytest.approx(ours["top5"])
    assert got["mean_per_class_recall"] == pytest.approx(ours["mean_per_class_recall"])

    register()  # clip_benchmark's own model registry now builds it
    from clip_benchmark.models import load_clip

    again, _, _ = load_clip("jclip_jax", str(data / "hf"), pretrained=None, cache_dir=None, device="cpu")
    ids = tokenizer(["a red circle"])
    np.testing.assert_allclose(again.encode_text(ids).numpy(), model.encode_text(ids).numpy(), atol=1e-6)
