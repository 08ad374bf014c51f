"""torch is a test/conversion extra: every module imports, and a model saves/loads, with torch blocked."""

import subprocess
import sys

SCRIPT = """
import importlib, pkgutil, sys
for name in ("torch", "timm", "open_clip", "torchvision"):
    sys.modules[name] = None  # any `import torch` now raises ImportError
import jclip_jax
EVAL_EXTRA = {"jclip_jax.evals.mteb_adapter", "jclip_jax.evals.clip_benchmark_adapter"}  # harness adapters
for m in pkgutil.walk_packages(jclip_jax.__path__, "jclip_jax."):
    if m.name in EVAL_EXTRA:  # need torch: without it they fail at import, saying which extra to install
        try:
            importlib.import_module(m.name)
        except ImportError as e:
            assert "pip install -e '.[eval]'" in str(e), str(e)
            continue
        raise AssertionError(m.name + " imported with torch blocked")
    importlib.import_module(m.name)
from flax import nnx
from jclip_jax import JinaCLIP
from jclip_jax.models import configs
model = JinaCLIP(configs.tiny(), rngs=nnx.Rngs(0))
model.save_pretrained(sys.argv[1])
JinaCLIP.from_pretrained(sys.argv[1])
print("ok")
"""


def test_library_works_without_torch(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
