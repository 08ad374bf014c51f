"""jclip-eval on every task type with a tiny model saved in the HF layout, checked against the model-card
API (encode_text / encode_image: unsharded, another code path) and independent scorers (trec_eval, scipy,
argmax by hand); a Matryoshka sweep with its plot; bad input failing in one line."""

import io
import json
import os

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from scipy.stats import spearmanr

from jclip_jax import JinaCLIP
from jclip_jax.data import records, synthetic
from jclip_jax.evals import cli
from jclip_jax.models import configs
from jclip_jax.tokenizer import TextTokenizer

OBJECTS = [("small", "red", "circle", "top left"), ("large", "blue", "square", "bottom right"),
           ("large", "green", "triangle", "top right"), ("small", "yellow", "square", "bottom left")]


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evals")
    tok = root / "tokenizer.json"
    synthetic.write_tokenizer(tok, synthetic.vocabulary_texts())
    model = JinaCLIP(configs.tiny(), rngs=nnx.Rngs(3), tokenizer=TextTokenizer(tok))
    model.save_pretrained(root / "hf")
    rng = np.random.default_rng(0)
    # Karpathy split file: 4 test images with 5 captions each, one train image, one corrupt test image
    (root / "images").mkdir()
    entries = []
    for i, obj in enumerate(OBJECTS + [OBJECTS[0]]):
        synthetic.render([obj], 48, rng).save(root / "images" / f"{i}.png")
        sentences = [synthetic.caption([obj])] + [synthetic.paraphrase(obj, rng) for _ in range(4)]
        entries.append({"filename": f"{i}.png", "split": "train" if i == 4 else "test",
                        "sentences": [{"raw": s} for s in sentences]})
    (root / "images" / "bad.png").write_bytes(b"not a png")
    entries.append({"filename": "bad.png", "split": "test", "sentences": [{"raw": "a broken image"}]})
    (root / "karpathy.json").write_text(json.dumps({"images": entries}))
    # zero-shot: class folders named by colour, 2 images each
    for colour in ("blue", "green", "red"):
        (root / "classes" / colour).mkdir(parents=True)
        for j in range(2):
            obj = ("large", colour, SHAPES[j], "top left")
            synthetic.render([obj], 40, rng).save(root / "classes" / colour / f"{j}.png")
    (root / "names.txt").write_text("blue thing\ngreen thing\nred thing\n")
    (root / "templates.txt").write_text("# two templates\na {c}.\na picture of a {c} shape\n")
    # BEIR: 6 documents, 3 judged queries (one has only a grade-0 judgement), an unjudged query
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = [synthetic.caption([o]) for o in OBJECTS] + ["the quick brown fox", "a purple circle"]
    with open(beir / "corpus.jsonl", "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": d}) + "\n")
        f.write("{broken json\n")
    queries = {"q0": "a red disc", "q1": "blue box at the bottom right", "q2": "fox", "q3": "unjudged"}
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq0\td5\t2\nq1\td1\t1\n"
                                              "q2\td4\t0\n")
    # STS: one malformed row
    sts = [("a red circle", "a red disc", 5), ("a red circle", "a blue square", 0.5),
           ("a small box", "a tiny block", 4), ("a green wedge", "green triangle", 3.5),
           ("the fox", "a purple circle", 0)]
    (root / "sts.tsv").write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in sts)
                                  + "x\ty\tnot-a-number\n")
    return root, model, sts


SHAPES = ("circle", "square")


def run(root, *args):
    out = root / "out.json"
    assert cli.main(["--checkpoint", str(root / "hf"), "--no-progress", "--output", str(out), *args]) == 0
    return json.loads(out.read_text())


def test_image_text_karpathy_with_a_sweep_and_plot(setup):
    root, model, _ = setup
    report = run(root, "--task", "image_text", "--data", str(root / "karpathy.json"), "--images",
                 str(root / "images"), "--truncate-dims", "16,32", "--plot", str(root / "sweep.png"))
    assert set(report["results"]) == {"full", "16", "32"}
    full = report["results"]["full"]
    assert (full["images"], full["captions"], full["decode_failures"]) == (5, 21, 1)  # bad.png: counted, dropped
    paths = [root / "images" / f"{i}.png" for i in range(4)]
    entries = json.loads((root / "karpathy.json").read_text())["images"][:4]
    captions = [s["raw"] for e in entries for s in e["sentences"]]
    owner = np.repeat(np.arange(4), 5)
    for label, dim in (("full", None), ("16", 16)):
        img, txt = model.encode_image(paths, truncate_dim=dim), model.encode_text(captions, truncate_dim=dim)
        sim = img @ txt.T
        assert report["results"][label]["text_to_image_r1"] == pytest.approx(np.mean(sim.argmax(0) == owner))
        i2t = np.mean(owner[sim.argmax(1)] == np.arange(4))
        assert report["results"][label]["image_to_text_r1"] == pytest.approx(i2t)
        ranks = (sim > sim[owner, np.arange(20)][None]).sum(0)  # images scoring above the caption's own
        assert report["results"][label]["text_to_image_r5"] == pytest.approx(np.mean(ranks < 5))
    with Image.open(root / "sweep.png") as png:
        assert png.size[0] > 100


def insert_damaged_record(directory, at: int = 2) -> None:
    """Rewrite a prepared directory's one shard with bytes that are no msgpack record at position `at`."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    ((shard,),) = [entry["paths"] for entry in records.read_manifest(directory)["datasets"].values()]
    reader = ArrayRecordReader(shard)
    raw = reader.read(0, reader.num_records())
    reader.close()
    writer = ArrayRecordWriter(shard, "group_size:1")
    for data in raw[:at] + [b"\xc1 not msgpack"] + raw[at:]:
        writer.write(data)
    writer.close()


def test_the_trainers_text_pair_set_skips_and_counts_a_corrupt_record(tmp_path):
    from jclip_jax.evals import train_eval

    pairs = [(f"query {i}", f"positive {i}") for i in range(4)]
    with records.RecordWriter(tmp_path / "pairs", "text_pair") as writer:
        for q, p in pairs:
            writer.write({"query": q, "positive": p, "dataset": "pairs"})
    insert_damaged_record(tmp_path / "pairs")
    queries, positives, skipped = train_eval.read_text_pairs(str(tmp_path / "pairs"))
    assert list(zip(queries, positives, strict=True)) == pairs and skipped == 1


def test_image_text_on_a_prepared_directory_skips_and_counts_a_corrupt_record(setup):
    """A prepared image_text directory with a damaged record among 4 good ones: jclip-eval reads the 4,
    counts the damaged one in skipped_records, and scores exactly what the same directory without it scores."""
    root, _, _ = setup
    for name in ("clean", "damaged"):  # the same 4 renderings in both
        rng = np.random.default_rng(1)
        with records.RecordWriter(root / name, "image_text") as writer:
            for obj in OBJECTS:
                png = io.BytesIO()
                synthetic.render([obj], 48, rng).save(png, "PNG")
                writer.write({"image": png.getvalue(), "captions": [synthetic.caption([obj])]})
    insert_damaged_record(root / "damaged")
    clean = run(root, "--task", "image_text", "--data", str(root / "clean"))["results"]["full"]
    damaged = run(root, "--task", "image_text", "--data", str(root / "damaged"))["results"]["full"]
    assert (damaged["images"], damaged["captions"], damaged["skipped_records"]) == (4, 4, 1)
    assert clean["skipped_records"] == 0
    assert {k: v for k, v in damaged.items() if k != "skipped_records"} == {
        k: v for k, v in clean.items() if k != "skipped_records"}


def test_zeroshot_classification(setup):
    root, model, _ = setup
    report = run(root, "--task", "zeroshot", "--data", str(root / "classes"), "--classnames", str(root / "names.txt"),
                 "--templates", str(root / "templates.txt"))["results"]["full"]
    names, templates = ["blue thing", "green thing", "red thing"], ["a {c}.", "a picture of a {c} shape"]
    weights = unit(np.stack([unit(model.encode_text([t.format(c=n) for t in templates])).mean(0) for n in names]))
    files = [root / "classes" / c / f"{j}.png" for c in ("blue", "green", "red") for j in range(2)]
    labels = np.repeat(np.arange(3), 2)
    pred = (model.encode_image(files) @ weights.T).argmax(1)
    assert report["top1"] == pytest.approx(np.mean(pred == labels))
    assert report["top5"] == 1.0  # 3 classes
    recall = [np.mean(pred[labels == c] == c) for c in range(3)]
    assert report["mean_per_class_recall"] == pytest.approx(np.mean(recall))
    assert (report["images"], report["classes"]) == (6, 3)


def test_beir_against_trec_eval(setup):
    import pytrec_eval

    root, model, _ = setup
    report = run(root, "--task", "beir", "--data", str(root / "beir"))["results"]["full"]
    docs = [json.loads(line)["text"] for line in (root / "beir" / "corpus.jsonl").read_text().splitlines()[:-1]]
    queries = {"q0": "a red disc", "q1": "blue box at the bottom right"}
    scores = model.encode_text(list(queries.values())) @ model.encode_text(docs).T
    run_ = {q: {f"d{d}": float(s) for d, s in enumerate(row)} for q, row in zip(queries, scores, strict=True)}
    qrels = {"q0": {"d0": 1, "d5": 2}, "q1": {"d1": 1}}
    trec = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100", "recip_rank"}).evaluate(run_)
    assert report["ndcg@10"] == pytest.approx(np.mean([v["ndcg_cut_10"] for v in trec.values()]), abs=1e-5)
    assert report["recall@100"] == pytest.approx(1.0)
    assert report["mrr@10"] == pytest.approx(np.mean([v["recip_rank"] for v in trec.values()]), abs=1e-5)
    # q2 has only a grade-0 judgement: left out and counted; the broken corpus line: skipped and counted
    assert report["queries_without_relevant"] == 1 and report["skipped_records"] == 1 and report["queries"] == 3


def test_sts_spearman(setup):
    root, model, sts = setup
    report = run(root, "--task", "sts", "--data", str(root / "sts.tsv"))["results"]["full"]
    cos = (model.encode_text([a for a, _, _ in sts]) * model.encode_text([b for _, b, _ in sts])).sum(1)
    assert report["spearman"] == pytest.approx(spearmanr(cos, [s for _, _, s in sts]).statistic, abs=1e-6)
    assert (report["pairs"], report["skipped_records"]) == (5, 1)


@pytest.mark.parametrize("args, message", [
    (["--task", "sts", "--data", "missing.tsv"], "data='missing.tsv' does not exist"),
    (["--task", "image_text", "--data", "KARPATHY"], "give the image folder"),
    (["--task", "zeroshot", "--data", "CLASSES", "--templates", "NAMES"], "needs a {c} placeholder"),
    (["--task", "zeroshot", "--data", "CLASSES", "--truncate-dims", "16,4096"], "exceed the model's embedding"),
    (["--task", "sts", "--data", "STS", "--truncate-dims", "a,b"], "--truncate-dims='a,b'"),
    (["--task", "sts", "--data", "STS", "--plot", "x.png"], "--plot needs --truncate-dims"),
])
def test_bad_input_fails_in_one_line(setup, capsys, args, message):
    root, _, _ = setup
    subst = {"KARPATHY": root / "karpathy.json", "CLASSES": root / "classes", "NAMES": root / "names.txt",
             "STS": root / "sts.tsv"}
    args = [str(subst.get(a, a)) for a in args]
    assert cli.main(["--checkpoint", str(root / "hf"), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jclip-eval: ") and message in err and len(err.splitlines()) == 1
    assert not os.path.exists(root / "x.png")
