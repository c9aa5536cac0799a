"""The mTOP decoder: a transformer decoder that generates ontology tokens or points at source words.

Following Rongali et al. 2020 ("Don't parse, generate"): at every step the decoder state gives generation
logits over the ontology vocabulary (``[PAD] [BOS] [EOS]`` + intents, slots, ``]``) and pointer scores over the
encoder positions (scaled dot-product attention scores); one softmax over their concatenation mixes the two
distributions, so the relative scale of the two parts plays the role of the generate/copy switch. Pointers
may only land on the first sub-word of a source word (whole words are copied). A pointer's input embedding at
the next step is the encoder state it points at; ontology tokens have their own embeddings.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ds_kd.finetune.data import BOS, EOS, PAD

# Finite "minus infinity": soft cross-entropy against these logits (ft-distill) must not produce 0 * inf.
NEG = -1e9


def rule_out(logits: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``logits`` with the entries ``where`` (broadcastable bool) set to :data:`NEG`, or to the dtype's minimum
    where NEG does not fit it (fp16): filled, never added, so that nothing overflows to -inf."""
    return logits.masked_fill(where, max(NEG, torch.finfo(logits.dtype).min))


class PointerDecoder(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_vocab: int, num_layers: int = 3,
                 ffn_size: int = 512, dropout: float = 0.1, max_target_len: int = 256):
        super().__init__()
        self.num_vocab = num_vocab
        self.max_target_len = max_target_len
        self.embed = nn.Embedding(num_vocab, hidden_size, padding_idx=PAD)
        self.position = nn.Embedding(max_target_len, hidden_size)
        self.norm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerDecoderLayer(hidden_size, num_heads, ffn_size, dropout, batch_first=True)
        self.layers = nn.TransformerDecoder(layer, num_layers)
        self.generate = nn.Linear(hidden_size, num_vocab)
        self.pointer_query = nn.Linear(hidden_size, hidden_size)
        self.pointer_key = nn.Linear(hidden_size, hidden_size)

    def embed_targets(self, ids_BU: torch.Tensor, memory_BTD: torch.Tensor) -> torch.Tensor:
        is_pointer = ids_BU >= self.num_vocab
        ontology = self.embed(torch.where(is_pointer, torch.zeros_like(ids_BU), ids_BU))
        positions = (ids_BU - self.num_vocab).clamp(min=0)
        copied = memory_BTD.gather(1, positions[..., None].expand(-1, -1, memory_BTD.shape[-1]))
        x_BUD = torch.where(is_pointer[..., None], copied, ontology)
        steps = torch.arange(ids_BU.shape[1], device=ids_BU.device)
        return self.dropout(self.norm(x_BUD + self.position(steps)[None]))

    def forward(self, ids_BU: torch.Tensor, memory_BTD: torch.Tensor, attention_mask_BT: torch.Tensor,
                pointer_mask_BT: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, U, num_vocab + T]`` of the next token after each prefix position."""
        if ids_BU.shape[1] > self.max_target_len:
            raise ValueError(f"target of {ids_BU.shape[1]} steps exceeds max_target_len={self.max_target_len}")
        steps = ids_BU.shape[1]
        # Boolean (True: not allowed), not an additive -inf: it holds in every dtype autocast may choose.
        causal = torch.ones(steps, steps, dtype=torch.bool, device=ids_BU.device).triu(diagonal=1)
        h_BUD = self.layers(self.embed_targets(ids_BU, memory_BTD), memory_BTD, tgt_mask=causal,
                            tgt_is_causal=True, memory_key_padding_mask=~attention_mask_BT.bool())
        gen_BUV = self.generate(h_BUD)
        # [PAD] and [BOS] are inputs only; they are never predicted.
        never = torch.zeros(self.num_vocab, dtype=torch.bool, device=ids_BU.device)
        never[PAD] = never[BOS] = True
        gen_BUV = rule_out(gen_BUV, never)
        scores_BUT = self.pointer_query(h_BUD) @ self.pointer_key(memory_BTD).transpose(1, 2)
        scores_BUT = scores_BUT / math.sqrt(h_BUD.shape[-1])
        scores_BUT = rule_out(scores_BUT, ~pointer_mask_BT.bool()[:, None, :])
        return torch.cat([gen_BUV, scores_BUT], dim=-1)

    @torch.no_grad()
    def beam_search(self, memory_BTD: torch.Tensor, attention_mask_BT: torch.Tensor,
                    pointer_mask_BT: torch.Tensor, beam_size: int = 1,
                    max_steps: int | None = None) -> list[list[int]]:
        """Best decoder ids per example (``[EOS]`` and later removed); ``beam_size=1`` is greedy decoding.

        Batched: the B x K hypotheses run as one batch; a finished hypothesis can only continue with
        ``[PAD]`` at no cost, so it keeps its score and occupies one beam slot. Scores are summed
        log-probabilities (no length penalty)."""
        num, beams = memory_BTD.shape[0], beam_size
        max_steps = min(max_steps or self.max_target_len, self.max_target_len)
        memory = memory_BTD.repeat_interleave(beams, 0)
        attn = attention_mask_BT.repeat_interleave(beams, 0)
        pointer = pointer_mask_BT.repeat_interleave(beams, 0)
        seqs = torch.full((num * beams, 1), BOS, dtype=torch.long, device=memory.device)
        scores_BK = torch.zeros(num, beams, device=memory.device)
        scores_BK[:, 1:] = float("-inf")  # all beams start identical: keep one alive
        finished = torch.zeros(num * beams, dtype=torch.bool, device=memory.device)
        for _ in range(max_steps):
            logp_NV = torch.log_softmax(self(seqs, memory, attn, pointer)[:, -1].float(), dim=-1)
            logp_NV[finished] = float("-inf")
            logp_NV[finished, PAD] = 0.0
            width = logp_NV.shape[-1]
            total = (scores_BK.reshape(-1, 1) + logp_NV).view(num, beams * width)
            scores_BK, flat = total.topk(beams, dim=-1)
            source = (torch.arange(num, device=memory.device)[:, None] * beams + flat // width).view(-1)
            tokens = (flat % width).view(-1, 1)
            seqs = torch.cat([seqs[source], tokens], dim=1)
            finished = finished[source] | tokens.view(-1).eq(EOS)
            if bool(finished.all()):
                break
        best = scores_BK.argmax(dim=-1)
        out = []
        for i in range(num):
            ids = seqs[i * beams + int(best[i]), 1:].tolist()
            out.append(ids[: ids.index(EOS)] if EOS in ids else ids)
        return out
