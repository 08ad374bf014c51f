"""jclip-prepare converters: small generated inputs in every format round-trip; bad items are skipped and
counted by reason; the last printed line is the JSON summary."""

import io
import json
import tarfile

import numpy as np
import pytest
from grain.sources import ArrayRecordDataSource
from PIL import Image

from jclip_jax.data import prepare, records, sources, synthetic


def encoded(colour, fmt="JPEG", size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


def read_all(directory, kind):
    """{dataset: [record, ...]} of a prepared directory, in file order."""
    manifest = records.read_manifest(directory, kind=kind)
    out = {}
    for name, entry in manifest["datasets"].items():
        source = ArrayRecordDataSource(entry["paths"])
        out[name] = [records.decode(source[i]) for i in range(len(source))]
        assert len(out[name]) == entry["count"]
    return out


def run_cli(argv, capsys):
    """Runs jclip-prepare in-process; returns the parsed last stdout line."""
    prepare.run(argv)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    return json.loads(last)


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_round_trip_skips_truncated_jpeg_and_missing_caption(tmp_path, capsys):
    jpg, png, webp = encoded((255, 0, 0)), encoded((0, 255, 0), "PNG"), encoded((0, 0, 255), "WEBP")
    truncated = encoded((9, 9, 9), size=(64, 64))[:-60]
    for i, shard in enumerate((
        [("000.jpg", jpg), ("000.txt", b"a red box"),
         ("001.png", png), ("001.json", json.dumps({"caption": "green", "url": "x"}).encode()),
         ("002.jpg", truncated), ("002.txt", b"broken")],
        [("sub/003.webp", webp), ("sub/003.txt", b"blue "),
         ("004.jpg", jpg), ("004.json", b'{"url": "no caption"}')],
    )):
        with tarfile.open(tmp_path / f"shard-{i}.tar", "w") as tar:
            for name, data in shard:
                add(tar, name, data)
    out = tmp_path / "out"
    summary = run_cli(["image-text", "--format", "webdataset", "--input", str(tmp_path / "shard-*.tar"),
                       "--output", str(out)], capsys)
    assert summary == {"written": 3, "skipped": {"missing_caption": 1, "unreadable_image": 1}}
    got = read_all(out, "image_text")["default"]
    assert [(r["key"], r["captions"], r["image"]) for r in got] == [
        ("000", ["a red box"], jpg), ("001", ["green"], png), ("sub/003", ["blue"], webp)]
    assert all(r["v"] == records.VERSION and r["kind"] == "image_text" for r in got)


def test_folder_csv_and_jsonl(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(encoded((10, 20, 30)))
    (tmp_path / "img" / "b.png").write_bytes(encoded((40, 50, 60), "PNG"))
    (tmp_path / "img" / "bad.jpg").write_bytes(b"not an image")
    (tmp_path / "captions.csv").write_text(
        'file,caption\nimg/a.jpg,"first, with comma"\nimg/b.png,second\nimg/missing.jpg,gone\n'
        "img/bad.jpg,bad\nimg/a.jpg,\n")
    summary = run_cli(["image-text", "--format", "folder", "--input", str(tmp_path / "captions.csv"),
                       "--output", str(tmp_path / "csv")], capsys)
    assert summary == {"written": 2, "skipped": {"missing_caption": 1, "missing_image": 1,
                                                 "unreadable_image": 1}}
    got = read_all(tmp_path / "csv", "image_text")["default"]
    assert [(r["key"], r["captions"]) for r in got] == [("img/a.jpg", ["first, with comma"]),
                                                        ("img/b.png", ["second"])]
    assert got[1]["image"] == (tmp_path / "img" / "b.png").read_bytes()

    (tmp_path / "captions.jsonl").write_text(
        '{"image": "b.png", "text": "from jsonl"}\n{broken json\n["a list"]\n')
    summary = run_cli(["image-text", "--format", "folder", "--input", str(tmp_path / "captions.jsonl"),
                       "--image-root", str(tmp_path / "img"), "--file-column", "image", "--caption-column",
                       "text", "--output", str(tmp_path / "jsonl")], capsys)
    assert summary == {"written": 1, "skipped": {"malformed_line": 2}}
    assert read_all(tmp_path / "jsonl", "image_text")["default"][0]["captions"] == ["from jsonl"]


def test_coco_and_karpathy_split_files(tmp_path, capsys):
    (tmp_path / "images" / "val").mkdir(parents=True)
    for name in ("1.jpg", "2.jpg", "val/3.jpg"):
        (tmp_path / "images" / name).write_bytes(encoded((1, 2, 3)))
    coco = {"images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"},
                       {"id": 9, "file_name": "9.jpg"}],
            "annotations": [{"image_id": 1, "caption": "one a"}, {"image_id": 1, "caption": "one b"},
                            {"image_id": 9, "caption": "nine"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    summary = run_cli(["image-text", "--format", "coco", "--input", str(tmp_path / "coco.json"),
                       "--image-root", str(tmp_path / "images"), "--output", str(tmp_path / "coco")], capsys)
    # image 2 has no caption; image 9 has a caption but no file
    assert summary == {"written": 1, "skipped": {"missing_caption": 1, "missing_image": 1}}
    assert read_all(tmp_path / "coco", "image_text")["default"][0]["captions"] == ["one a", "one b"]

    karpathy = {"images": [
        {"filepath": "val", "filename": "3.jpg", "split": "test",
         "sentences": [{"raw": "three"}, {"raw": "3"}]},
        {"filename": "1.jpg", "split": "train", "sentences": [{"raw": "train only"}]},
        {"filename": "2.jpg", "split": "test", "sentences": []}]}
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(karpathy))
    summary = run_cli(["image-text", "--format", "coco", "--input", str(tmp_path / "dataset_flickr30k.json"),
                       "--image-root", str(tmp_path / "images"), "--split", "test",
                       "--output", str(tmp_path / "karpathy")], capsys)
    assert summary == {"written": 1, "skipped": {"missing_caption": 1}}
    got = read_all(tmp_path / "karpathy", "image_text")["default"]
    assert [(r["key"], r["captions"]) for r in got] == [("val/3.jpg", ["three", "3"])]


def test_text_pairs_grouped_by_dataset(tmp_path, capsys):
    lines = [{"query": "q1", "positive": "p1", "dataset": "msmarco"},
             {"query": "q2", "positive": "p2"},  # no dataset: --dataset
             {"query": "q3", "positive": "p3", "dataset": "nq"},
             {"query": "q4", "dataset": "nq"},  # no positive
             {"query": "q5", "positive": "p5", "dataset": "msmarco"}]
    text = "\n".join(json.dumps(line) for line in lines) + "\nnot json\n"
    (tmp_path / "pairs.jsonl").write_text(text)
    summary = run_cli(["text-pairs", "--input", str(tmp_path / "pairs.jsonl"), "--dataset", "misc",
                       "--output", str(tmp_path / "out")], capsys)
    assert summary == {"written": 4, "skipped": {"malformed_line": 1, "malformed_record": 1}}
    got = read_all(tmp_path / "out", "text_pair")
    assert {name: [(r["query"], r["positive"]) for r in rs] for name, rs in got.items()} == {
        "misc": [("q2", "p2")], "msmarco": [("q1", "p1"), ("q5", "p5")], "nq": [("q3", "p3")]}


def test_triplets_need_seven_negatives(tmp_path, capsys):
    negatives = [f"n{i}" for i in range(7)]
    lines = [{"query": "q", "positive": "p", "negatives": negatives, "dataset": "nli"},
             {"query": "q", "positive": "p", "negatives": negatives[:6], "dataset": "nli"},
             {"query": "q", "positive": "p", "negatives": negatives[:6] + [""], "dataset": "nli"}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    summary = run_cli(["triplets", "--input", str(tmp_path / "t.jsonl"), "--output", str(tmp_path / "out")],
                      capsys)
    assert summary == {"written": 1, "skipped": {"bad_negatives": 2}}
    assert read_all(tmp_path / "out", "triplet")["nli"][0]["negatives"] == negatives


def test_cli_errors_name_the_problem(tmp_path):
    with pytest.raises(SystemExit, match="no input files match"):
        prepare.main(["text-pairs", "--input", str(tmp_path / "nothing*.jsonl"),
                      "--output", str(tmp_path / "o")])
    (tmp_path / "a.jsonl").write_text('{"query": "q", "positive": "p"}\n')
    assert not (tmp_path / "o").exists()
    prepare.main(["text-pairs", "--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "o2")])
    # the same command again is a resume of a finished run: nothing to do, the same dataset
    prepare.main(["text-pairs", "--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "o2")])
    assert [r["query"] for r in read_all(tmp_path / "o2", "text_pair")["default"]] == ["q"]
    (tmp_path / "b.jsonl").write_text('{"query": "q2", "positive": "p2"}\n')
    with pytest.raises(SystemExit, match="holds a preparation of other inputs or options .differing: units"):
        prepare.main(["text-pairs", "--input", str(tmp_path / "b.jsonl"), "--output", str(tmp_path / "o2")])
    synthetic.write_synthetic(tmp_path / "synth", num_train=2, num_eval=2, num_text_pairs=2, num_triplets=1)
    with pytest.raises(SystemExit, match="already holds a prepared dataset"):
        prepare.main(["text-pairs", "--input", str(tmp_path / "a.jsonl"), "--output",
                      str(tmp_path / "synth" / "text_pairs")])


def test_record_schema_rejects_bad_records():
    with pytest.raises(records.RecordError, match="'captions'"):
        records.encode({"kind": "image_text", "image": b"x", "captions": []})
    with pytest.raises(records.RecordError, match="kind must be one of"):
        records.encode({"kind": "video"})
    newer = records.msgpack.packb({"v": records.VERSION + 1, "kind": "text_pair"})
    with pytest.raises(records.RecordError, match="newer"):
        records.decode(newer)


def test_synthetic_dataset(tmp_path, capsys):
    summary = run_cli(["synthetic", "--output", str(tmp_path), "--num-train", "16", "--num-eval", "120",
                       "--num-text-pairs", "10", "--num-triplets", "5"], capsys)
    held_out_pairs = len(synthetic.OBJECTS)  # eval_text_pairs: one per distinct caption
    assert summary == {"written": 16 + 120 + 2 * 10 + 5 + held_out_pairs, "skipped": {}}
    pairs = read_all(tmp_path / "eval_text_pairs", "text_pair")["paraphrase"]
    assert len({r["query"] for r in pairs}) == held_out_pairs
    assert all(r["query"] != r["positive"] for r in pairs)
    evals = read_all(tmp_path / "eval", "image_text")["synthetic"]
    captions = [r["captions"][0] for r in evals]
    assert len(set(captions)) == 120  # chance-level R@1 = 1/120 < 1%
    # The object sits where its caption says, in the colour it says: sample the pixel at the nominal
    # centre (jitter: position +-3% of the side, colour +-15 per channel).
    for record in evals:
        (size, colour, shape, position), = [o for o in synthetic.OBJECTS if synthetic.caption([o]) ==
                                            record["captions"][0]]
        img = np.asarray(Image.open(io.BytesIO(record["image"])).convert("RGB"), np.int32)
        assert img.shape == (64, 64, 3)
        cx, cy = (np.asarray(synthetic.POSITIONS[position]) * 64).astype(int)
        assert np.abs(img[cy, cx] - synthetic.COLOURS[colour]).max() <= 20, record["captions"]
        # the diagonally opposite quadrant is background (dark: every channel < 60 + antialiasing)
        assert img[64 - 1 - cy, 64 - 1 - cx].max() < 64
    pairs = read_all(tmp_path / "text_pairs", "text_pair")
    assert sorted(pairs) == ["attributes", "paraphrase"] and all(len(v) == 10 for v in pairs.values())
    triplets = read_all(tmp_path / "triplets", "triplet")["synthetic"]
    assert len(triplets) == 5 and all(len(t["negatives"]) == 7 for t in triplets)
    assert (tmp_path / "tokenizer.json").exists()


def test_tfds_source_needs_a_prepared_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="not prepared in array_record format"):
        sources.TfdsImageTextSource("mnist", "train", data_dir=str(tmp_path))


def test_tfds_source_keeps_encoded_images(monkeypatch):
    """The wrapper asks tfds not to decode images and turns examples into image_text records.
    (A real array_record tfds dataset cannot be built here: writing one needs TensorFlow.)"""
    import tensorflow_datasets as tfds  # the test extra installs it (no TensorFlow)

    jpg = encoded((5, 6, 7))
    calls = {}

    def fake_data_source(name, split, data_dir, download, decoders):
        calls.update(name=name, split=split, download=download, decoders=decoders)
        return [{"image": jpg, "caption": b"a caption"}, {"image": jpg, "caption": [b"x", b"y"]}]

    monkeypatch.setattr(tfds, "data_source", fake_data_source)
    source = sources.TfdsImageTextSource("coco_captions", "val", data_dir="/d", caption_key="caption")
    assert calls["download"] is False and isinstance(calls["decoders"]["image"], tfds.decode.SkipDecoding)
    assert len(source) == 2
    first, second = records.decode(source[0]), records.decode(source[1])
    assert first["image"] == jpg and first["captions"] == ["a caption"] and second["captions"] == ["x", "y"]
