"""Test set-up: a virtual 8-device CPU mesh, set before jax is imported anywhere."""

import os
import shutil
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One persistent XLA compilation cache for the run, shared by the pytest workers and the jclip-train /
# jclip-eval subprocesses they start (they inherit the environment): many tests compile the same demo
# programs (about a minute each on 2 cores). tests/test_multihost.py strips JAX_* from its processes: there
# a cache hit in one process while its peer still compiles can miss gloo's 30 s window for the first
# collective. The directory is made by the first process that imports this file (the xdist controller,
# whose environment the workers inherit) and removed by that process at the end.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jclip-tests-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the many small programs too


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# The multi-process trainer tests take the longest (about 7 minutes of one pytest worker): start them first, so
# that the other worker runs everything else meanwhile (with `--dist loadscope`, pyproject addopts: each
# module on one worker, so module fixtures that train or compile run once).
LONGEST_FIRST = ("tests/test_multihost.py",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(LONGEST_FIRST))


@pytest.fixture(scope="module")
def small_synthetic_dir(tmp_path_factory):
    """A small copy of the embedded synthetic dataset (32 px), written once per test module."""
    from jclip_jax.data import synthetic

    root = tmp_path_factory.mktemp("synthetic")
    synthetic.write_synthetic(root, num_train=32, num_eval=16, num_text_pairs=32, num_triplets=16, image_size=32)
    return str(root)
