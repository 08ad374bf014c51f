"""Import timm / open_clip on CPU-only torch (test code only).

PyPI's torchvision for torch 2.13 is a CUDA build whose C++ ops are missing on CPU torch, so
`import torchvision` (pulled in by timm and open_clip) fails registering fake kernels for
`torchvision::nms` / `qnms`. Declaring the two op schemas first lets the import succeed; we never
call them (see ../shared/reference/stack-notes.md).
"""

import torch

_LIB = None


def _declare_torchvision_ops():
    global _LIB
    if _LIB is not None:
        return
    try:
        _LIB = torch.library.Library("torchvision", "DEF")
        _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:  # already declared (a real CPU torchvision, or a second import path)
        pass


def import_timm():
    _declare_torchvision_ops()
    import timm

    return timm


def import_open_clip():
    _declare_torchvision_ops()
    import open_clip

    return open_clip


def import_transformers():
    """transformers (JinaEmbeddingsV3Model, the v2 text-tower oracle); safe next to timm in one process."""
    _declare_torchvision_ops()
    import transformers

    return transformers
