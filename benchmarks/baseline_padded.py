"""The usual way NeoBERT is run, re-implemented for comparison: the model card's usage pattern.

Fixed-size batches in input order, each padded to its longest text, a dense (batch x heads x len x len)
additive mask, RoPE over padded positions: what `AutoModel.from_pretrained(..., trust_remote_code=True)`
followed by `model(**tokenizer(batch, padding=True, return_tensors="pt"))` computes. It reuses the
weights of a loaded pipeline model so both sides run the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.model.neobert import NeoBERT, apply_rope


@torch.inference_mode()
def padded_forward(model: NeoBERT, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """input_ids, attention_mask (B, L) -> last hidden state (B, L, C), computed densely with padding."""
    B, L = input_ids.shape
    H = model.config.num_attention_heads
    D = model.config.head_dim
    # (B, L) 1/0 -> additive (B, H, L, L), as the remote code expands it.
    additive = torch.zeros(B, L, dtype=model.tok_embeddings.weight.dtype, device=input_ids.device)
    additive = additive.masked_fill(attention_mask == 0, float("-inf"))
    # The remote code materialises this with .repeat(); a broadcast view computes the same, in less memory.
    mask = additive[:, None, None, :].expand(B, H, L, L)
    cos, sin = model.rope_cos[:L], model.rope_sin[:L]
    x = model.tok_embeddings(input_ids)  # (B, L, C)
    for layer in model.layers:
        q, k, v = layer.qkv(layer.attention_norm(x)).view(B, L, H, 3 * D).chunk(3, dim=-1)
        q = apply_rope(q.reshape(B * L, H, D), cos.repeat(B, 1), sin.repeat(B, 1)).view(B, L, H, D)
        k = apply_rope(k.reshape(B * L, H, D), cos.repeat(B, 1), sin.repeat(B, 1)).view(B, L, H, D)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        x = x + layer.wo(attn.transpose(1, 2).reshape(B, L, H * D))
        x = x + layer.ffn(layer.ffn_norm(x))
    return model.norm(x)


def embed_like_the_model_card(model: NeoBERT, token_ids: list, batch_size: int, device: torch.device) -> torch.Tensor:
    """[CLS] vectors for documents in input order, batch_size at a time, padded per batch."""
    out = []
    for start in range(0, len(token_ids), batch_size):
        batch = token_ids[start : start + batch_size]
        L = max(len(t) for t in batch)
        ids = torch.zeros(len(batch), L, dtype=torch.long)
        mask = torch.zeros(len(batch), L, dtype=torch.long)
        for i, t in enumerate(batch):
            ids[i, : len(t)] = torch.as_tensor(t, dtype=torch.long)
            mask[i, : len(t)] = 1
        hidden = padded_forward(model, ids.to(device), mask.to(device))
        out.append(hidden[:, 0].float().cpu())
    return torch.cat(out)
