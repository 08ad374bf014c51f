"""jclip-compile: the tiny config compiled for a small TPU topology (v5e:2x2) with libtpu, on this CPU host.

The report's fields are checked against the compiled object's own analyses, the HLO FLOP counter against
hand-computed FLOPs of a calibration program with loops, and an oversized batch against the compiler's
refusal (non-zero exit). Nothing runs on a TPU: the devices are compile-only.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import libtpu  # noqa: E402, F401  (the test extra installs it; without it this module fails rather than skips)
import pytest
from helpers import load_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jclip_jax import sharding
from jclip_jax.compile import hlo, program, report, topology
from jclip_jax.training import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")
TOPOLOGY = "v5e:2x2"
SMALL = dict(image_batch_size=16, text_batch_size=16, image_max_length=16, text_max_length=16)


def demo_config(**data):
    c = load_config("demo")
    c.model.dtype = "bfloat16"
    c.model.vision.patch_dropout = 0.0  # so the compiled FLOPs match the analytic model FLOPs
    c.data.update(data)
    return c


@pytest.fixture(scope="module")
def compiled_tiny():
    step = program.compile_train_step(demo_config(**SMALL), topology.topology_devices(TOPOLOGY))
    return step, report.build_report(step, TOPOLOGY)


def test_hlo_flops_count_loop_trip_counts_on_a_calibration_program():
    """A scan of L matmuls (forward + backward), a fori_loop starting at 1 and a strided conv: the HLO
    count equals the hand count per device; cost_analysis() counts each loop body once."""
    mesh = sharding.make_mesh((("data", -1),), topology.topology_devices(TOPOLOGY))
    layers, m, k, trips = 6, 64, 256, 3

    def scan_loss(ws, x):
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)
        return jnp.sum(h.astype(jnp.float32))

    def f(ws, x, img, kernel):  # grad of a scan; a while loop counting from 1; a strided conv (patch embed)
        _, g = jax.lax.while_loop(lambda c: c[0] < 1 + trips, lambda c: (c[0] + 1, jnp.sin(c[1] @ ws[0])), (1, x))
        conv = jax.lax.conv_general_dilated(img, kernel, (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.grad(scan_loss)(ws, x), g, conv

    rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    args = (jax.ShapeDtypeStruct((layers, k, k), jnp.bfloat16, sharding=rep),
            jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=rows),
            jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32, sharding=rows),
            jax.ShapeDtypeStruct((4, 4, 3, 128), jnp.float32, sharding=rep))
    compiled = jax.jit(f).lower(*args).compile()
    analysis = hlo.analyze(compiled.as_text())
    local = m // 4  # rows per device
    scan = 3 * layers * 2 * local * k * k  # per layer: the forward matmul and two backward ones
    loop = trips * 2 * local * k * k
    conv = 2 * (8 // 4) * 8 * 8 * 128 * (4 * 4 * 3)
    assert analysis.matmul_flops == scan + loop + conv
    assert sorted(n for _, n in analysis.loops) == [trips, layers, layers]
    assert not analysis.unknown_trip_counts
    assert compiled.cost_analysis()["flops"] < 0.5 * analysis.matmul_flops  # one trip per loop


def test_flash_attention_compiles_for_tpu_and_its_kernels_are_counted():
    """tiny-v2 (EVA02 + XLM-RoBERTa, both with Pallas' flash attention) compiles for v5e:2x2; the report
    counts the forward kernel from its cost estimate and the two backward kernels from their dots, so no
    kernel is left uncounted, and the attention logits no longer appear as XLA matmuls. Under a global
    'highest' matmul precision (which some test modules set at import) it fails in one line instead."""
    c = load_config("jina_clip_v2", "stage=1,runlocal")
    c.model.dtype, c.model.vision.patch_dropout, c.model.attention = "bfloat16", 0.0, "flash"
    c.data.update(SMALL)
    with jax.default_matmul_precision("highest"), pytest.raises(ValueError, match="jax_default_matmul_precision"):
        program.compile_train_step(c, topology.topology_devices(TOPOLOGY))
    with jax.default_matmul_precision("default"):
        step = program.compile_train_step(c, topology.topology_devices(TOPOLOGY))
    r, analysis = report.build_report(step, TOPOLOGY), hlo.analyze(step.compiled.as_text())
    assert r["fits"] and r["unknown_kernels"] == []
    kernels = analysis.matmul_sources["bf16 x bf16 -> f32 (pallas kernel)"]
    assert {n.split("_block")[0] for n in kernels} == {"flash_attention", "flash_mha_bwd_dkv", "flash_mha_bwd_dq"}
    assert not any("BTNH,BSNH->BNTS" in n for sources in analysis.matmul_sources.values() for n in sources)


def test_fsdp_embedding_lookup_moves_rows_not_the_table():
    """With the table split along its width over 'fsdp' and the batch over data x fsdp, GSPMD lowers a plain
    jnp.take by all-gathering the whole table and all-reducing a whole-table gradient (v2: 250,002 x 1,024).
    layers.embedding_lookup moves only ids and looked-up rows (one all-to-all each way); the table's
    gradient stays a width slice, reduced over 'data' only."""
    from jclip_jax.models import layers

    mesh = sharding.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 1)), topology.topology_devices(TOPOLOGY))
    vocab, width, batch, length = 8191, 512, 256, 128  # as many tokens per chip as rows in the table

    def collectives(lookup):
        def loss(table, ids):
            with layers.activation_sharding(mesh, sharding.DEFAULT_RULES):
                return jnp.sum(jnp.tanh(lookup(table, ids)).astype(jnp.float32))

        table = jax.ShapeDtypeStruct((vocab, width), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp")))
        ids = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
        compiled = jax.jit(jax.grad(loss), out_shardings=table.sharding).lower(table, ids).compile()
        return {kind: c["bytes"] for kind, c in hlo.analyze(compiled.as_text()).collectives.items()}

    plain = collectives(lambda t, i: layers.constrain_activation(  # what the towers did before
        jnp.take(t, i, axis=0).astype(jnp.bfloat16), "batch", None, None))
    assert plain["all-gather"] >= vocab * width * 2  # the bf16 table, whole, on every chip
    ours = collectives(lambda t, i: layers.embedding_lookup(t, i, jnp.bfloat16))
    rows_per_chip = batch * length // 4 * width * 2  # bf16
    assert ours["all-gather"] <= batch * length * 4 // 2  # the ids, over 'fsdp'
    assert ours["all-to-all"] <= 2 * rows_per_chip  # the rows, forward and backward
    assert ours["all-reduce"] <= vocab * width * 4 // 2  # the f32 gradient's width slice, over 'data'


ASYNC_COLLECTIVE_HLO = """HloModule step
%fused_computation.1 (p0: bf16[64,256]) -> bf16[1024,256] {
  %p0 = bf16[64,256]{1,0} parameter(0)
  ROOT %all-gather.1 = bf16[1024,256]{1,0} all-gather(%p0), channel_id=7, dimensions={0}
}
%async_collective_fusion.2 (p0: bf16[64,256]) -> bf16[1024,256] {
  %p0 = bf16[64,256]{1,0} parameter(0)
  ROOT %all-gather.2 = bf16[1024,256]{1,0} all-gather(%p0), channel_id=7, dimensions={0}
}
%fused_computation.3 (p0: bf16[64,256]) -> bf16[1024,256] {
  %p0 = bf16[64,256]{1,0} parameter(0)
  ROOT %all-gather.3 = bf16[1024,256]{1,0} all-gather(%p0), channel_id=7, dimensions={0}
}
ENTRY %main (w: bf16[64,256], x: f32[128,512]) -> f32[128,512] {
  %w = bf16[64,256]{1,0} parameter(0)
  %x = f32[128,512]{1,0} parameter(1)
  %async-collective-start.1 = bf16[1024,256]{1,0} fusion(%w), kind=kCustom, calls=%fused_computation.1
  %fusion.2 = bf16[1024,256]{1,0} fusion(%w), kind=kCustom, calls=%async_collective_fusion.2
  %async-collective-done.1 = bf16[1024,256]{1,0} fusion(%w), kind=kCustom, calls=%fused_computation.3
  %all-reduce.1 = f32[128,512]{1,0} all-reduce(%x), channel_id=1, to_apply=%add
  ROOT %all-reduce.2 = f32[128,512]{1,0} all-reduce(%all-reduce.1), channel_id=1, to_apply=%add
}
"""


def test_an_async_collective_split_over_fusions_is_counted_once():
    """TPU async collectives appear as clones (one channel id) in the start, continuation and done fusions of
    one computation: one all-gather. Two separate all-reduces that share a channel id are two."""
    analysis = hlo.analyze(ASYNC_COLLECTIVE_HLO)
    assert analysis.collectives["all-gather"] == {"count": 1, "bytes": 1024 * 256 * 2}
    assert analysis.collectives["all-reduce"] == {"count": 2, "bytes": 2 * 128 * 512 * 4}


def test_fsdp_weight_gradient_is_counted_as_a_reduce_scatter():
    """A weight sharded over the devices that also split the batch (FSDP): its gradient is a partial sum
    per device, reduced and kept sharded. On TPU XLA emits that as an `all-reduce-scatter` fusion around an
    all-reduce; the analysis must count it as one reduce-scatter of the full gradient, not an all-reduce,
    and the forward's weight all-gather as one all-gather of the full weight."""
    mesh = sharding.make_mesh((("fsdp", -1),), topology.topology_devices(TOPOLOGY))
    m, k = 64, 512

    def weight_grad(w, x):
        return jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w.astype(jnp.bfloat16)).astype(jnp.float32)))(w)

    sharded = NamedSharding(mesh, P("fsdp", None))
    args = (jax.ShapeDtypeStruct((k, k), jnp.float32, sharding=sharded),
            jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=sharded))
    compiled = jax.jit(weight_grad, out_shardings=sharded).lower(*args).compile()
    collectives = hlo.analyze(compiled.as_text()).collectives
    assert "all-reduce" not in collectives
    # The gradient of the bf16 copy, reduced before its cast back to f32 (XLA's choice) or after it.
    assert collectives["reduce-scatter"]["count"] == 1
    assert collectives["reduce-scatter"]["bytes"] in (k * k * 2, k * k * 4)
    assert collectives["all-gather"]["count"] == 1
    assert collectives["all-gather"]["bytes"] in (k * k * 2, k * k * 4)  # gathered as bf16 or f32


def test_report_matches_the_compiled_programs_own_analyses(compiled_tiny):
    step, r = compiled_tiny
    mem = step.compiled.memory_analysis()
    assert r["memory"] == {"argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
                           "alias": mem.alias_size_in_bytes, "temp": mem.temp_size_in_bytes,
                           "generated_code": mem.generated_code_size_in_bytes}
    assert r["fits"] and r["hbm_bytes"] < r["hbm_capacity_bytes"] == 16 * 1024**3
    assert r["cost_analysis_flops"] == step.compiled.cost_analysis()["flops"]
    assert r["chips"] == 4 and r["mesh"] == {"data": 4}
    # Analytic model FLOPs (flops.py) per chip; compiled = model + the (small) loss, without remat.
    model = flops.train_step_flops(step.run.config.model, 16, 16, 16) / 4
    assert r["model_flops"] == model
    assert 0.97 < r["hlo_matmul_flops"] / model < 1.06
    assert r["hlo_matmul_flops"] > 1.3 * r["cost_analysis_flops"]  # scan over layers counted once there
    # bf16 towers: bf16 x bf16 matmuls carry almost all FLOPs; the loss's are float32 at 'highest'.
    mix = r["dtype_mix"]
    assert sum(v for key, v in mix.items() if key.startswith("bf16 x bf16")) > 0.9
    highest = [key for key in mix if key.startswith("f32 x f32") and key.endswith("(highest)")]
    assert highest
    # Each matmul outside the main mix is traced to the Python line that made it (the HLO's stack frames):
    # the 'highest' ones to the loss, the tower's f32-logit attention ones to the towers' attention calls.
    sources = r["matmul_sources"]
    assert set(sources) == set(mix) - {max(mix, key=mix.get)}
    assert all(name.startswith("training/losses.py:") for key in highest for name in sources[key])
    for key in sources.keys() - set(highest):
        assert all(name.startswith("models/") and "BTNH,BSNH->BNTS" in name for name in sources[key]), sources
    # Pure data parallelism: gradients all-reduced; every parameter replicated.
    assert r["collectives"]["all-reduce"]["count"] >= 1
    assert r["replicated_fraction"] == 1.0 and r["replicated_params"] == []
    rf = r["roofline"]
    assert rf["compute_s"] == r["hlo_matmul_flops"] / topology.CHIPS["v5e"].peak_flops
    assert rf["step_s_lower_bound"] >= rf["compute_s"] and 0 < rf["mfu_upper_bound"] <= 1
    text = report.format_report(r)
    assert "FITS" in text and "DOES NOT" not in text


def test_loss_logits_run_at_the_configured_precision(compiled_tiny):
    """loss.precision='highest' (the default): every float32 x float32 matmul of the compiled program
    (the loss's logits, forward and backward) carries operand_precision=highest, none runs at default."""
    step, _ = compiled_tiny
    computations, _ = hlo.parse(step.compiled.as_text())
    f32_matmuls = []
    for instrs in computations.values():
        shapes = {i.name: i for i in instrs}
        for i in instrs:
            if i.opcode in ("dot", "convolution") and all(shapes[o].arrays[0][0] == "f32" for o in i.operands[:2]):
                f32_matmuls.append("operand_precision={highest,highest}" in i.attrs)
    assert len(f32_matmuls) >= 4 and all(f32_matmuls)


def test_an_oversized_batch_does_not_fit_and_exits_nonzero(tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    cmd = [sys.executable, "-m", "jclip_jax.compile.cli", "--config", DEMO, "--topology", TOPOLOGY,
           "--json", str(out), "--config.data.image_batch_size=1048576", "--config.data.text_batch_size=64",
           "--config.data.image_max_length=16", "--config.data.text_max_length=16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    assert "DOES NOT FIT" in proc.stdout and "knobs to try" in proc.stdout
    import json

    r = json.loads(out.read_text())
    assert r["fits"] is False and r["hbm_bytes"] > 10 * r["hbm_capacity_bytes"]  # the compiler's figures
    assert r["hbm_capacity_bytes"] <= 16 * 1024**3 and r["knobs"]


def test_bad_topology_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "jclip_jax.compile.cli", "--config", DEMO, "--topology", "v9x:2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "--topology='v9x:2'" in proc.stderr
