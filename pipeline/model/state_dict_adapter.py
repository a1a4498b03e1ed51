"""The one place that knows the released checkpoint's tensor names.

`{}` stands for the layer number. The released NeoBERTLMHead file prefixes every encoder key with
`model.` and adds an MLM head (`decoder.weight`, `decoder.bias`) that embedding does not use; a
checkpoint saved from the bare encoder has the same names without the prefix.
"""

from __future__ import annotations

import re

import torch

from pipeline.errors import ModelError

CHECKPOINT_TO_NATIVE: dict[str, str] = {
    "encoder.weight": "tok_embeddings.weight",
    "transformer_encoder.{}.attention_norm.weight": "layers.{}.attention_norm.weight",
    "transformer_encoder.{}.qkv.weight": "layers.{}.qkv.weight",
    "transformer_encoder.{}.wo.weight": "layers.{}.wo.weight",
    "transformer_encoder.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
    "transformer_encoder.{}.ffn.w12.weight": "layers.{}.ffn.w12.weight",
    "transformer_encoder.{}.ffn.w3.weight": "layers.{}.ffn.w3.weight",
    "layer_norm.weight": "norm.weight",
}
LM_HEAD_PREFIX = "model."
LM_HEAD_ONLY_KEYS = frozenset({"decoder.weight", "decoder.bias"})

_LAYER_NUMBER = re.compile(r"\.(\d+)\.")


class CheckpointKeyError(ModelError):
    """The checkpoint's tensor names do not match a NeoBERT encoder."""


def to_native(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a released (prefixed, with MLM head) or bare encoder state dict to native names."""
    if any(key.startswith(LM_HEAD_PREFIX) for key in checkpoint):
        checkpoint = {
            key.removeprefix(LM_HEAD_PREFIX): tensor
            for key, tensor in checkpoint.items()
            if key not in LM_HEAD_ONLY_KEYS
        }
    native, unexpected = {}, []
    for key, tensor in checkpoint.items():
        template = _LAYER_NUMBER.sub(".{}.", key, count=1)
        target = CHECKPOINT_TO_NATIVE.get(template)
        if target is None:
            unexpected.append(key)
            continue
        layer = _LAYER_NUMBER.search(key)
        native[target.format(layer.group(1)) if layer else target] = tensor
    if unexpected:
        raise CheckpointKeyError(f"unexpected tensors in the checkpoint: {sorted(unexpected)}")
    return native


def to_checkpoint(native: dict[str, torch.Tensor], lm_head: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Inverse of to_native: with an lm_head, the released `model.`-prefixed layout; else bare."""
    inverse = {v: k for k, v in CHECKPOINT_TO_NATIVE.items()}
    out = {}
    for key, tensor in native.items():
        template = _LAYER_NUMBER.sub(".{}.", key, count=1)
        layer = _LAYER_NUMBER.search(key)
        name = inverse[template].format(layer.group(1)) if layer else inverse[template]
        out[(LM_HEAD_PREFIX + name) if lm_head is not None else name] = tensor
    if lm_head is not None:
        out.update(lm_head)
    return out
