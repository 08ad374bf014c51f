"""Evaluation (big_vision's evaluators/, apart from training): metrics, tasks on local data, the sharded
embedder, jclip-eval, the trainer's evaluator, and adapters for the mteb and clip_benchmark harnesses."""
