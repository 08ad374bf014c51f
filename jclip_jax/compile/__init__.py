"""Ahead-of-time compilation of the training step for a named TPU topology, on any host (`jclip-compile`).

    topology.py  chip table (HBM, peak FLOP/s, HBM bandwidth), abstract devices, the config's mesh on them
    program.py   abstract train state and batch (eval_shape) and the trainer's own step, lowered and compiled
    hlo.py       the compiled HLO read back: matmul FLOPs with loop trip counts, dtype mix, collectives
    report.py    fit / memory / FLOPs / collectives / roofline, as a dict and as text
    cli.py       jclip-compile --config FILE --topology v5p:4x4x4 [--config.key=value ...]
"""
