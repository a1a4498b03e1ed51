"""The usual way NeoBERT is run, re-implemented for comparison: the model card's usage pattern.

Fixed-size batches in input order, each padded to its longest text, a dense (batch x heads x len x len)
boolean mask materialised per batch (as the remote code's repeat() does), RoPE over padded
positions: what `AutoModel.from_pretrained(..., trust_remote_code=True)` followed by
`model(**tokenizer(batch, padding=True, return_tensors="pt"))` computes. It reuses the weights of a
loaded pipeline model so both sides run the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.model.neobert import NeoBERT, rms_norm, rope_complex, silu_mul


@torch.inference_mode()
def padded_forward(model: NeoBERT, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """input_ids, attention_mask (B, L) -> last hidden state (B, L, C), computed densely with padding."""
    B, L = input_ids.shape
    H = model.config.num_attention_heads
    D = model.config.head_dim
    # As the remote code does: (B, L) -> (B, H, L, L), materialised with repeat() and passed as bool.
    mask = attention_mask[:, None, None, :].repeat(1, H, L, 1).bool()
    rotations = torch.view_as_real(model.rope_rotations(input_ids.device)[:L].repeat(B, 1))  # (B*L, D/2, 2)
    x = model.tok_embeddings(input_ids)  # (B, L, C)
    for layer in model.layers:
        h = rms_norm(x, layer.attention_norm.weight, layer.attention_norm.eps)
        q, k, v = layer.qkv(h).view(B, L, H, 3 * D).chunk(3, dim=-1)
        q = rope_complex(q.reshape(B * L, H, D), rotations).view(B, L, H, D)
        k = rope_complex(k.reshape(B * L, H, D), rotations).view(B, L, H, D)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        x = x + layer.wo(attn.transpose(1, 2).reshape(B, L, H * D))
        x = x + layer.ffn.w3(silu_mul(layer.ffn.w12(rms_norm(x, layer.ffn_norm.weight, layer.ffn_norm.eps))))
    return rms_norm(x, model.norm.weight, model.norm.eps)


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
