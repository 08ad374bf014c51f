"""jclip-prepare on inputs that used to lose data silently: each is now skipped and counted, or stops with a
one-line error (non-zero exit, no output directory left behind)."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from test_data_prepare import add, encoded, read_all, run_cli

from jclip_jax.data import prepare, records
from jclip_jax.data.pipeline import ImageTextTransform


def folder_cli(tmp_path, table, *extra):
    return ["image-text", "--format", "folder", "--input", str(table), "--image-root", str(tmp_path / "img"),
            "--output", str(tmp_path / "out"), *extra]


@pytest.fixture
def images(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / "img" / name).write_bytes(encoded((10, 20, 30)))
    return tmp_path / "img"


def test_dataset_names_that_sanitise_alike_keep_distinct_files(tmp_path, capsys):
    lines = [{"query": f"q{i}", "positive": f"p{i}", "dataset": name}
             for name in ("web qa", "web/qa", "web_qa") for i in range(3)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    summary = run_cli(["text-pairs", "--input", str(tmp_path / "pairs.jsonl"), "--output", str(tmp_path / "out")],
                      capsys)
    assert summary == {"written": 9, "skipped": {}}
    manifest = records.read_manifest(tmp_path / "out")
    files = [f for entry in manifest["datasets"].values() for f in entry["files"]]
    assert len(set(files)) == len(files) == 3
    got = read_all(tmp_path / "out", "text_pair")
    assert {name: [r["query"] for r in rs] for name, rs in got.items()} == {
        name: ["q0", "q1", "q2"] for name in ("web qa", "web/qa", "web_qa")}
    assert all(r["dataset"] == name for name, rs in got.items() for r in rs)


def test_csv_extra_fields_are_counted_never_truncated_and_a_bom_is_read(tmp_path, images, capsys):
    # Excel writes a BOM; row 2 has an unquoted comma in its caption (3 fields for a 2-column header)
    (tmp_path / "c.csv").write_bytes(
        "\ufefffile,caption\na.jpg,\"quoted, kept whole\"\nb.jpg,unquoted, cut here\nc.jpg,plain\n".encode())
    summary = run_cli(folder_cli(tmp_path, tmp_path / "c.csv"), capsys)
    assert summary == {"written": 2, "skipped": {"malformed_line": 1}}
    got = read_all(tmp_path / "out", "image_text")["default"]
    assert [(r["key"], r["captions"]) for r in got] == [("a.jpg", ["quoted, kept whole"]), ("c.jpg", ["plain"])]


def test_a_table_without_the_named_columns_is_one_line_error(tmp_path, images):
    (tmp_path / "c.csv").write_text("image,text\na.jpg,a caption\n")
    with pytest.raises(SystemExit, match=r"c.csv: no column 'file', 'caption'; its columns are \['image', 'text'\]"):
        prepare.main(folder_cli(tmp_path, tmp_path / "c.csv"))
    (tmp_path / "c.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\n')
    with pytest.raises(SystemExit, match=r"no column 'file'; its columns are \['image', 'caption'\]"):
        prepare.main(folder_cli(tmp_path, tmp_path / "c.jsonl"))
    assert not (tmp_path / "out").exists()


def test_non_utf8_lines_are_counted_and_named_under_verbose(tmp_path, images, capsys):
    (tmp_path / "c.csv").write_bytes(b"file,caption\na.jpg,caf\xe9 latin-1\nb.jpg,fine\n")
    summary = run_cli(folder_cli(tmp_path, tmp_path / "c.csv"), capsys)
    assert summary == {"written": 1, "skipped": {"malformed_line": 1}}

    lines = [b'{"query": "q1", "positive": "p1"}', b'{"query": "caf\xe9", "positive": "p2"}',
             b'{"query": "q3", "positive": "p3"}']
    (tmp_path / "p.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    prepare.run(["text-pairs", "--input", str(tmp_path / "p.jsonl"), "--output", str(tmp_path / "pairs"),
                 "--verbose"])
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1]) == {"written": 2, "skipped": {"malformed_line": 1}}
    assert f"{tmp_path / 'p.jsonl'}:2: not UTF-8 (byte 0xe9" in captured.err
    assert [r["query"] for r in read_all(tmp_path / "pairs", "text_pair")["default"]] == ["q1", "q3"]


def test_non_utf8_csv_line_is_named_under_verbose(tmp_path, images, capsys):
    (tmp_path / "c.csv").write_bytes(b"file,caption\na.jpg,fine\nb.jpg,caf\xe9\n")
    prepare.run(folder_cli(tmp_path, tmp_path / "c.csv", "--verbose"))
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1]) == {"written": 1, "skipped": {"malformed_line": 1}}
    assert f"{tmp_path / 'c.csv'}:3: not UTF-8" in captured.err


def test_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path, capsys):
    """A uniform 16-bit greyscale PNG of value v * 257 (v's exact 16-bit expansion) decodes to v."""
    (tmp_path / "img").mkdir()
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16), 100 * 257, np.uint16)).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"  # what PIL makes of it
    (tmp_path / "img" / "deep.png").write_bytes(buf.getvalue())
    (tmp_path / "c.csv").write_text("file,caption\ndeep.png,a grey square\n")
    run_cli(folder_cli(tmp_path, tmp_path / "c.csv"), capsys)
    record, = read_all(tmp_path / "out", "image_text")["default"]
    pixels = ImageTextTransform("unused", 8, 8, random_crop=False).image(record["image"], None)
    assert pixels.shape == (8, 8, 3) and (pixels == 100).all()


def test_undecodable_caption_bytes_are_counted(tmp_path, capsys):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        add(tar, "0.jpg", encoded((1, 2, 3)))
        add(tar, "0.txt", b"caf\xe9")
        add(tar, "1.jpg", encoded((1, 2, 3)))
        add(tar, "1.txt", "caf\u00e9".encode())
    summary = run_cli(["image-text", "--format", "webdataset", "--input", str(tmp_path / "s.tar"),
                       "--output", str(tmp_path / "out")], capsys)
    assert summary == {"written": 1, "skipped": {"undecodable_caption": 1}}
    assert read_all(tmp_path / "out", "image_text")["default"][0]["captions"] == ["caf\u00e9"]


@pytest.mark.parametrize("content, message", [
    (None, "no input files match"),
    (b"", "empty file, not a tar archive"),
    (b"this is not a tar archive\n" * 40, "not a tar archive"),
])
def test_unusable_tar_inputs_are_one_line_errors_leaving_no_output(tmp_path, content, message):
    if content is not None:
        (tmp_path / "s.tar").write_bytes(content)
    with pytest.raises(SystemExit, match=message) as error:
        prepare.main(["image-text", "--format", "webdataset", "--input", str(tmp_path / "*.tar"),
                      "--output", str(tmp_path / "out")])
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_nothing_converted_is_an_error_not_an_empty_dataset(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"query": "only a query"}\n')
    with pytest.raises(SystemExit, match=r"no record could be converted .* \{'malformed_record': 1\}"):
        prepare.main(["text-pairs", "--input", str(tmp_path / "p.jsonl"), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
