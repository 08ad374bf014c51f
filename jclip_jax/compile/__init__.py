"""Ahead-of-time compilation of the training step for a named TPU topology, on any host (`jclip-compile`).

    topology.py  chip table (HBM, peak FLOP/s, HBM bandwidth), a topology's abstract devices
    program.py   the trainer's own set-up (training/setup.py) on those devices: its step lowered and compiled
    hlo.py       the compiled HLO read back: matmul FLOPs with loop trip counts, dtype mix, collectives
    report.py    fit / memory / FLOPs / collectives / roofline, as a dict and as text
    cli.py       jclip-compile --config FILE --topology v5p:4x4x4 [--config.key=value ...]
"""
