"""jclip-prepare at scale: workers, shards of the inputs, finalize, resume after a kill, img2dataset output."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from PIL import Image
from test_data_prepare import add, encoded, read_all, run_cli

from jclip_jax.data import parts, prepare


def write_img2dataset_tars(directory, shards: int, per_shard: int, size=(12, 10)):
    """img2dataset's layout: KEY.jpg, KEY.txt and KEY.json {"key", "url", "caption", "status", ...}."""
    directory.mkdir(exist_ok=True)
    for s in range(shards):
        with tarfile.open(directory / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                add(tar, f"{key}.jpg", encoded((s * 20 % 256, i * 10 % 256, 7), size=size))
                add(tar, f"{key}.txt", f"caption {s} {i}".encode())
                add(tar, f"{key}.json", json.dumps({"key": key, "url": f"http://x/{key}.jpg", "caption":
                                                    f"caption {s} {i}", "status": "success"}).encode())
    return str(directory / "*.tar")


def as_set(directory):
    rows = [(r["key"], r.get("url"), tuple(r["captions"]), r["image"])
            for rs in read_all(directory, "image_text").values() for r in rs]
    assert len(rows) == len(set(rows)), "a record was written twice"
    return set(rows)


def webdataset(inputs, output, *extra):
    return ["image-text", "--format", "webdataset", "--input", inputs, "--output", str(output), *extra]


def test_two_workers_and_two_shards_write_the_records_of_one_worker(tmp_path, capsys):
    inputs = write_img2dataset_tars(tmp_path / "tars", shards=5, per_shard=4)
    one = run_cli(webdataset(inputs, tmp_path / "one"), capsys)
    assert one == {"written": 20, "skipped": {}}
    expected = as_set(tmp_path / "one")
    assert ("000030002", "http://x/000030002.jpg", ("caption 3 2",)) in {r[:3] for r in expected}

    assert run_cli(webdataset(inputs, tmp_path / "two", "--workers", "2", "--records-per-shard", "3"),
                   capsys) == one
    assert as_set(tmp_path / "two") == expected

    first = run_cli(webdataset(inputs, tmp_path / "sharded", "--num-shards", "2", "--shard-index", "1"), capsys)
    assert first == {"written": 8, "skipped": {}, "pending_units": 3}  # units 1 and 3 of 0..4
    assert not (tmp_path / "sharded" / "manifest.json").exists()
    with pytest.raises(SystemExit, match=r"3 of 5 units are missing or partial .*: 0 \(.*00000.tar\), 2 "):
        prepare.main(["finalize", str(tmp_path / "sharded")])
    # the last part to finish writes the manifest
    assert run_cli(webdataset(inputs, tmp_path / "sharded", "--num-shards", "2", "--shard-index", "0"),
                   capsys) == one
    assert as_set(tmp_path / "sharded") == expected
    names = os.listdir(tmp_path / "sharded")
    assert len([n for n in names if n.endswith(".array_record")]) == 5  # one per (input shard, part)
    assert run_cli(["finalize", str(tmp_path / "sharded")], capsys) == one


def test_a_unit_written_twice_fails_finalize(tmp_path, capsys):
    inputs = write_img2dataset_tars(tmp_path / "tars", shards=2, per_shard=2)
    run_cli(webdataset(inputs, tmp_path / "out"), capsys)
    marker = next((tmp_path / "out" / ".prepare" / "parts").glob("000001.*.json"))
    (marker.parent / "000001.other-run.json").write_bytes(marker.read_bytes())  # a second writer's marker
    with pytest.raises(SystemExit, match=r"1 unit\(s\) written twice, e.g. unit 1 .*00001.tar"):
        prepare.main(["finalize", str(tmp_path / "out")])


def test_rerun_redoes_partial_units_and_skips_verified_ones(tmp_path, capsys):
    inputs = write_img2dataset_tars(tmp_path / "tars", shards=3, per_shard=4)
    run_cli(webdataset(inputs, tmp_path / "out"), capsys)
    expected = as_set(tmp_path / "out")
    out = tmp_path / "out"
    # a crash mid-way: no manifest yet, unit 0's shard cut short after its marker, unit 1 without a marker,
    # unit 2 complete (must be kept, not rewritten)
    (out / "manifest.json").unlink()
    shard0 = next(out.glob("default-000000-*.array_record"))
    shard0.write_bytes(shard0.read_bytes()[:-40])
    next((out / ".prepare" / "parts").glob("000001.*")).unlink()
    shard2 = next(out.glob("default-000002-*.array_record"))
    mtime = shard2.stat().st_mtime_ns
    with pytest.raises(SystemExit, match="units are missing or partial"):
        prepare.main(["finalize", str(out)])
    assert run_cli(webdataset(inputs, out), capsys) == {"written": 12, "skipped": {}}
    assert as_set(out) == expected
    assert shard2.stat().st_mtime_ns == mtime
    # a finished directory whose shard went bad: the rerun drops the manifest before redoing the unit
    shard2.write_bytes(b"")
    assert run_cli(webdataset(inputs, out), capsys) == {"written": 12, "skipped": {}}
    assert as_set(out) == expected


def test_killed_prepare_then_rerun_gives_the_same_records(tmp_path, capsys):
    inputs = write_img2dataset_tars(tmp_path / "tars", shards=24, per_shard=6, size=(256, 256))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "jclip_jax.data.prepare"] + webdataset(inputs, out)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        markers = list((out / ".prepare" / "parts").glob("*.json")) if out.exists() else []
        if len(markers) >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_mid_way = len(list((out / ".prepare" / "parts").glob("*.json"))) < 24
    assert killed_mid_way, "the conversion finished before it could be killed; make the inputs larger"
    assert not (out / "manifest.json").exists()
    with pytest.raises(SystemExit, match="units are missing or partial"):
        prepare.main(["finalize", str(out)])
    assert run_cli(webdataset(inputs, out), capsys) == {"written": 144, "skipped": {}}
    run_cli(webdataset(inputs, tmp_path / "reference"), capsys)
    assert as_set(out) == as_set(tmp_path / "reference")


def test_img2dataset_json_caption_min_size_and_resize(tmp_path, capsys):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        add(tar, "a.jpg", encoded((200, 10, 10), size=(40, 20)))
        add(tar, "a.json", json.dumps({"key": "k-a", "url": "http://a", "caption": "from json"}).encode())
        add(tar, "b.png", encoded((10, 200, 10), "PNG", size=(8, 30)))
        add(tar, "b.txt", b"too small")
        add(tar, "c.png", encoded((10, 10, 200), "PNG", size=(12, 16)))
        add(tar, "c.txt", b"kept as is")
    summary = run_cli(webdataset(str(tmp_path / "s.tar"), tmp_path / "out", "--min-image-size", "10",
                                 "--resize-shorter-side", "12"), capsys)
    assert summary == {"written": 2, "skipped": {"image_too_small": 1}}
    a, c = read_all(tmp_path / "out", "image_text")["default"]
    assert (a["key"], a["url"], a["captions"]) == ("k-a", "http://a", ["from json"])
    resized = Image.open(io.BytesIO(a["image"]))
    assert (resized.format, resized.size) == ("JPEG", (24, 12))  # shorter side 20 -> 12, aspect kept
    assert abs(int(resized.convert("RGB").getpixel((12, 6))[0]) - 200) <= 8
    assert c["image"] == encoded((10, 10, 200), "PNG", size=(12, 16))  # shorter side already 12: untouched
    assert "url" not in c


def test_table_inputs_split_into_row_units_across_workers(tmp_path, capsys):
    lines = [{"query": f"q{i}", "positive": f"p{i}", "dataset": "ab"[i % 2]} for i in range(23)]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    args = ["text-pairs", "--input", str(tmp_path / "p.jsonl"), "--rows-per-unit", "5"]
    one = run_cli(args + ["--output", str(tmp_path / "one")], capsys)
    two = run_cli(args + ["--output", str(tmp_path / "two"), "--workers", "2"], capsys)
    assert one == two == {"written": 23, "skipped": {}}
    assert read_all(tmp_path / "one", "text_pair") == read_all(tmp_path / "two", "text_pair")
    assert [r["query"] for r in read_all(tmp_path / "two", "text_pair")["a"]] == [f"q{i}" for i in range(0, 23, 2)]
    assert parts.read_plan(str(tmp_path / "two"))["units"][-1][1:] == [20, 23]
