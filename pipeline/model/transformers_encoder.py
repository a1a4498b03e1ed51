"""Any encoder that `transformers` supports natively, behind the same packed interface as NeoBERT.

The pipeline hands over documents back to back (ids (T,), cu_seqlens (N+1,)); they are length-sorted,
so padding them to the longest in the pack wastes little. No code from the Hub ever runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.model.checkpoint import UnsupportedModelError


class TransformersEncoder(torch.nn.Module):
    """A transformers AutoModel taking packed documents and returning packed hidden states (T, C)."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int) -> None:
        super().__init__()
        self.model = model
        self.pad_token_id = pad_token_id
        self.hidden_size = int(model.config.hidden_size)
        self.attention_implementation = str(model.config._attn_implementation)

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, attention=None):
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # (N,)
        mask = torch.arange(max_seqlen, device=input_ids.device) < lengths.unsqueeze(1)  # (N, L)
        padded = torch.full(mask.shape, self.pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
        padded[mask] = input_ids  # row-major order of the mask is the packing order
        hidden = self.model(input_ids=padded, attention_mask=mask.long()).last_hidden_state  # (N, L, C)
        return hidden[mask]  # (T, C)


def load_transformers_encoder(folder: Path, device: torch.device, dtype: torch.dtype) -> TransformersEncoder:
    """AutoModel from folder (safetensors only, never remote code), in eval mode on device."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except ValueError as err:  # a model type transformers lacks: it would need the checkpoint's own code
        raise UnsupportedModelError(
            f"{folder}: transformers cannot build this model without running code shipped with the checkpoint, "
            f"which the pipeline never does ({err})"
        ) from err
    if config.model_type not in MODEL_MAPPING_NAMES:
        raise UnsupportedModelError(
            f"{folder}: model type {config.model_type!r} has no built-in transformers encoder; the pipeline "
            "never runs code shipped with a checkpoint, so it supports NeoBERT and transformers' own models"
        )
    # transformers picks its SDPA attention where the architecture has one, else the eager path.
    model = AutoModel.from_pretrained(folder, config=config, trust_remote_code=False, use_safetensors=True, dtype=dtype)
    model.to(device).eval()
    pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    return TransformersEncoder(model, pad_token_id)
