"""bench/device.py (the one-shot accelerator benchmark) runs end to end in its CPU smoke mode and prints
its table: a train-step row for remat on and off, both towers, and an attention row."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_benchmark_smoke_mode_prints_the_table():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "device.py"), "--smoke"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    assert sum(ln.startswith("| train step | remat=") for ln in table) == 2
    assert any(ln.startswith("| text tower") for ln in table) and any(ln.startswith("| image tower") for ln in table)
    assert any(ln.startswith("| dot_product_attention") for ln in table)
    result = json.loads(proc.stdout.splitlines()[-1])
    for row in result["train_step"].values():
        assert row["step_s"] > 0 and 0 < row["mfu"] < 1 and row["pairs_per_s"] > 0
