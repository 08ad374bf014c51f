"""Training: the config, its one set-up, the loop and the step, in the order a run uses them.

    cli.py              jclip-train's command line: --config file.py[:arg], --workdir, one-line errors
    config.py           the config schema, its defaults and all of its validation
    setup.py            setup(config, workdir): everything before the first step; jclip-compile and bench/
                        call it too, so the compiled program is the trained one
    loop.py             train(config, workdir): read a batch, step, log, evaluate, save, stop on SIGTERM
    initial_weights.py  where a run's weights start: a previous stage, a jina-clip directory, pretrained towers
    step.py             the jitted update: tower features, GradCache, the loss's gradient, the optimizer
    losses.py           InfoNCE with and without hard negatives, sharded over the batch; the stage's joint loss
    optim.py            AdamW with the paper's schedule, weight-decay mask, frozen params, lr multipliers
    metrics.py          the progress line and TensorBoard events
    flops.py            analytic model FLOPs (MFU) and the devices' peak
    checkpoints.py      orbax checkpoints with digests, quarantine of damaged ones, saved configs
    workdir_lock.py     one run per workdir
"""
