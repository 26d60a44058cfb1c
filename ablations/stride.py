"""The backbone's total stride, measured on the model itself, and the smallest input it can take.

SE blocks never change a shape, so the plain backbone answers for every setting of a sweep; it is built
on the meta device (shapes only: no memory, no initialisation) once per backbone and process.
"""

from __future__ import annotations

import functools
import math

import torch

from ablations.errors import SpecError
from ablations.patch import build_backbone
from ablations.schema import BackboneSpec, RunConfig

PROBE_SIDE = 1024  # input side of the shape-only pass: large enough for any ResNet's stride


def input_stride(backbone: BackboneSpec) -> int:
    """The backbone's total downsampling factor."""
    return _input_stride(backbone.model_dump_json())


@functools.lru_cache(maxsize=64)  # per process: every trial of a worker shares its sweep's backbone
def _input_stride(backbone_json: str) -> int:
    backbone = BackboneSpec.model_validate_json(backbone_json)
    with torch.device("meta"):
        model = build_backbone(backbone).eval()
        out = model.forward_features(torch.empty(1, backbone.in_chans, PROBE_SIDE, PROBE_SIDE))
    return math.ceil(PROBE_SIDE / out.shape[-1])


def check_input_size(cfg: RunConfig) -> None:
    """Inputs smaller than the total stride leave the last stage less than one real pixel."""
    stride = input_stride(cfg.backbone)
    if cfg.data.input_size < stride:
        raise SpecError(f"{cfg.data.input_size} is too small for this backbone (total stride {stride}; "
                        f"need at least {stride})", key="data.input_size")
