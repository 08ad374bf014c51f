"""Training metrics: a tqdm progress line and TensorBoard event files (tensorboardX, no TensorFlow).

Every `log_every` steps: per-task losses, temperature (tau = 1 / exp(logit_scale)), learning rate, grad
norm, pairs/s, model FLOP/s and MFU (analytic FLOPs, jclip_jax/training/flops.py), the records skipped so far, and
for an image-text mixture the realised share of each source so far (`mixture/<name>`, this process's).
"""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np
from tqdm import tqdm


class MetricsWriter:
    def __init__(self, workdir: str, total_steps: int, start_step: int, flops_per_step: float,
                 pairs_per_step: int, peak_flops: float, peak_source: str):
        self.is_main = jax.process_index() == 0
        self.flops_per_step, self.pairs_per_step, self.peak_flops = flops_per_step, pairs_per_step, peak_flops
        self.peak_source = peak_source
        self.skipped = 0
        self.mixture_names: list[str] = []
        self._mixture_counts = None
        self._window_start, self._window_steps = time.perf_counter(), 0
        self._first_logged = False
        self._total_time, self._total_steps = 0.0, 0
        self.tb = None
        # a live bar on a terminal only; logs get the periodic step lines (tqdm.write prints either way)
        interactive = self.is_main and sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not interactive, dynamic_ncols=True,
                        desc="train", mininterval=1.0)
        if self.is_main:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except Exception as e:  # e.g. a gs:// workdir without a GCS-capable writer: keep training
                tqdm.write(f"TensorBoard events disabled: {e}")

    def count_skipped(self, n: int) -> None:
        self.skipped += n

    def counters(self) -> dict:
        """What the run has counted so far (saved with each checkpoint, so a resumed run goes on counting)."""
        mixture = None if self._mixture_counts is None else self._mixture_counts.tolist()
        return {"skipped_records": int(self.skipped), "mixture_counts": mixture}

    def load_counters(self, counters: dict) -> None:
        self.skipped = int(counters.get("skipped_records", 0))
        mixture = counters.get("mixture_counts")
        self._mixture_counts = None if mixture is None else np.asarray(mixture, np.int64)

    def count_mixture(self, counts) -> None:
        """Adds a batch's `source_counts` (None: not a mixture)."""
        if counts is not None:
            counts = np.asarray(counts, np.int64)
            self._mixture_counts = counts if self._mixture_counts is None else self._mixture_counts + counts

    def mixture(self) -> dict[str, float]:
        """{"mixture/<source>": share of the image-text examples so far}; {} without a mixture."""
        if self._mixture_counts is None or not self._mixture_counts.sum():
            return {}
        shares = self._mixture_counts / self._mixture_counts.sum()
        names = self.mixture_names or [str(i) for i in range(len(shares))]
        return {f"mixture/{n}": float(v) for n, v in zip(names, shares, strict=True)}

    def step(self, step: int, metrics, log: bool) -> None:
        self._window_steps += 1
        self.bar.update(1)
        if not log:
            return
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for the step
        now = time.perf_counter()
        seconds = (now - self._window_start) / self._window_steps
        if self._first_logged:  # the first window holds compilation: keep it out of the totals
            self._total_time += now - self._window_start
            self._total_steps += self._window_steps
        self._first_logged = True
        self._window_start, self._window_steps = now, 0
        values["temperature"] = 1.0 / values["logit_scale"]
        values["pairs_per_s"] = self.pairs_per_step / seconds
        values["model_flops_per_s"] = self.flops_per_step / seconds
        values["mfu"] = values["model_flops_per_s"] / self.peak_flops
        values["skipped_records"] = self.skipped
        values["step_seconds"] = seconds
        values.update(self.mixture())
        self.bar.set_postfix({k: f"{values[k]:.3g}" for k in ("loss", "temperature", "pairs_per_s", "mfu")})
        if self.is_main:  # one host prints for the run
            self.bar.write(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())))
        self._write(step, values)

    def throughput(self) -> dict:
        if not self._total_steps:
            return {}
        seconds = self._total_time / self._total_steps
        return {"pairs_per_s": self.pairs_per_step / seconds, "mfu": self.flops_per_step / seconds / self.peak_flops,
                "model_flops_per_s": self.flops_per_step / seconds, "peak_flops_source": self.peak_source}

    def eval(self, step: int, results: dict, final: bool = False) -> None:
        if not results or not self.is_main:
            return
        numeric = {k: v for k, v in results.items() if isinstance(v, (int, float, np.floating))}
        self._write(step, {f"eval/{k}": v for k, v in numeric.items()})
        rows = [f"  {k:<24} {v:.4f}" if isinstance(v, float) else f"  {k:<24} {v}" for k, v in sorted(results.items())]
        self.bar.write(("final evaluation" if final else f"evaluation at step {step}") + "\n" + "\n".join(rows))

    def _write(self, step: int, values: dict) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
