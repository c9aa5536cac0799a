"""The BERT family: one encoder file with Hugging Face BERT parameter names.

- Presets of the paper's Table 1 (``mbert8-large``, ``mbert8-base``, ``leanbert``) and tiny CPU twins of the
  same proportions (``tiny-large``, ``tiny-base``, ``tiny-leanbert``: the same layer ratios 24:12:4 -> 12:6:2,
  the same width ratio 1024:768 -> 64:48 and head ratio 16:12 -> 4:3).
- PyTorch SDPA attention by default; when asked, every hidden state and the pre-softmax attention scores
  (what distillation needs), computed by the explicit path.
- Packed rows (several sentences per row) attend per sentence (:mod:`ds_kd.models.sentence_attention`), with the
  same results as the block-diagonal masked product.
- The MLM head computes vocabulary logits only at the predicted positions: with a 120k vocabulary a dense
  head costs about as much as the whole BERT-Base encoder. Input and output embeddings are tied.
- ``save_pretrained``/``from_pretrained`` write and read Hugging Face ``BertForMaskedLM`` directories: our
  exports load with ``transformers.AutoModelForMaskedLM``, and any BERT checkpoint that transformers loads
  (``BertModel``, ``BertForMaskedLM``, ``BertForPreTraining``; sharded; old ``gamma``/``beta`` names) loads
  here, read through transformers itself.

This module knows nothing of DeepSpeed, ranks or devices.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ds_kd.errors import UsageError
from ds_kd.models.config import (PRESET_LR, PRESETS, BertConfig, config_from_file, default_lr,  # noqa: F401
                                 make_config)  # the model's configuration, importable from here as before
from ds_kd.models.sentence_attention import SentenceBuckets, mask_scores
from ds_kd.textfile import read_json


class Record(dict):
    """Typed model output with attribute access. A dict, because DeepSpeed ZeRO-3 looks for the tensors of a
    module's output (to hook the backward pass) inside dicts, tuples and lists, not inside dataclasses."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class EncoderOutput(Record):
    """What the encoder returns; the tuples are filled only when asked for.

    - ``last_hidden_state`` [B, T, D]
    - ``hidden_states``: L+1 x [B, T, D], the embeddings then each layer's output (or None)
    - ``attention_scores``: L x [B, H, T, T], pre-softmax, without the padding mask added (or None); for packed
      rows attending per sentence (the default), L x :class:`ds_kd.models.sentence_attention.SentenceScores` (per
      sentence; ``to_dense`` gives [B, H, T, T])
    """

    def __init__(self, last_hidden_state: torch.Tensor, hidden_states: tuple[torch.Tensor, ...] | None = None,
                 attention_scores: tuple[torch.Tensor, ...] | None = None):
        super().__init__(last_hidden_state=last_hidden_state, hidden_states=hidden_states,
                         attention_scores=attention_scores)


class MLMOutput(Record):
    """MLM result, logits only at the predicted positions.

    - ``loss``: mean cross-entropy over the predicted positions (None without labels)
    - ``logits`` [N, V] for the N predicted positions, in row-major (batch, time) order
    - ``predicted``: where the logits are, as given ([B, T] bool, or [N] long flat positions; see
      :func:`gather_predicted`)
    - ``encoder``: the :class:`EncoderOutput`
    """

    def __init__(self, loss: torch.Tensor | None, logits: torch.Tensor, predicted: torch.Tensor,
                 encoder: EncoderOutput):
        super().__init__(loss=loss, logits=logits, predicted=predicted, encoder=encoder)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids_BT: torch.Tensor, token_type_ids_BT: torch.Tensor | None,
                position_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids_BT is None:
            positions = torch.arange(input_ids_BT.shape[1], device=input_ids_BT.device)[None]  # [1, T]
        else:
            positions = position_ids_BT
        x_BTD = self.word_embeddings(input_ids_BT) + self.position_embeddings(positions)
        if token_type_ids_BT is None:
            x_BTD = x_BTD + self.token_type_embeddings.weight[0]
        else:
            x_BTD = x_BTD + self.token_type_embeddings(token_type_ids_BT)
        return self.dropout(self.LayerNorm(x_BTD))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def _heads(self, x_BTD: torch.Tensor) -> torch.Tensor:
        b, t, _ = x_BTD.shape
        return x_BTD.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]

    def forward(self, x_BTD: torch.Tensor, keep_B1QT: torch.Tensor | SentenceBuckets, want_scores: bool):
        dropout_p = self.dropout_p if self.training else 0.0
        if isinstance(keep_B1QT, SentenceBuckets):  # packed rows, attention per sentence
            return keep_B1QT.attend(self.query(x_BTD), self.key(x_BTD), self.value(x_BTD), self.num_heads,
                                    dropout_p, want_scores)
        q, k, v = self._heads(self.query(x_BTD)), self._heads(self.key(x_BTD)), self._heads(self.value(x_BTD))
        scores_BHTT = None
        if want_scores:
            # Explicit path: distillation needs the pre-softmax scores (TinyBERT's attention loss).
            scores_BHTT = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            probs = torch.softmax(mask_scores(scores_BHTT, keep_B1QT), dim=-1)
            ctx = F.dropout(probs, dropout_p, self.training) @ v
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep_B1QT, dropout_p=dropout_p)
        b, h, t, dh = ctx.shape
        return ctx.transpose(1, 2).reshape(b, t, h * dh), scores_BHTT


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x_BTD: torch.Tensor, residual_BTD: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x_BTD)) + residual_BTD)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)  # the name gives HF's "attention.self.query" parameter path
        self.output = BertSelfOutput(cfg)

    def forward(self, x_BTD, keep_B1QT, want_scores):
        ctx_BTD, scores = self.self(x_BTD, keep_B1QT, want_scores)
        return self.output(ctx_BTD, x_BTD), scores


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x_BTD))


class BertOutput(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x_BTF: torch.Tensor, residual_BTD: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x_BTF)) + residual_BTD)


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x_BTD, keep_B1QT, want_scores):
        attn_BTD, scores = self.attention(x_BTD, keep_B1QT, want_scores)
        return self.output(self.intermediate(attn_BTD), attn_BTD), scores


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


PACKED_ATTENTION = ("sentences", "masked")
"""The ways packed rows attend (``BertModel.packed_attention``)."""


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation of one module (Devlin et al. 2019; HF ``BertPreTrainedModel._init_weights``): linear
    and embedding weights N(0, ``std``) (``initializer_range``, 0.02), biases 0, the padding row 0, LayerNorm 1 and
    0. A linear layer without a bias (the MLM decoder tied to the word embeddings) is left as it is. Without it,
    torch's defaults give embeddings N(0, 1): position and segment rows 50x the scale of BERT's, which drown
    the word embeddings a student is given."""
    if isinstance(module, nn.Linear):
        if module.bias is None:
            return
        nn.init.normal_(module.weight, std=std)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class BertModel(nn.Module):
    """The encoder: embeddings and transformer layers (HF ``BertModel`` names, without the pooler), initialised
    as BERT (:func:`init_bert_weights`) on construction."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.apply(partial(init_bert_weights, std=cfg.initializer_range))
        self.packed_attention = "sentences"
        """How packed rows attend: ``sentences`` (per sentence, :mod:`ds_kd.models.sentence_attention`) or ``masked``
        (one T x T product per row with the block-diagonal mask)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
                output_attention_scores: bool = False, position_ids: torch.Tensor | None = None,
                sequence_ids: torch.Tensor | None = None,
                sentence_buckets: SentenceBuckets | None = None) -> EncoderOutput:
        """``input_ids`` [B, T]; ``attention_mask`` [B, T] (1 = real token; default all real).

        Packed rows (several sentences in one row) pass ``sequence_ids`` [B, T] (1, 2, ... for the sentences of
        a row, 0 at padding) and ``position_ids`` [B, T] (restarting at 0 for each sentence): attention is then
        block-diagonal, a token attending only to the tokens of its own sentence, so every sentence gets the
        same outputs as when it is run alone (packed BERT, Krell et al. 2021). ``sentence_buckets``, the layout
        :meth:`SentenceBuckets.build` makes of these ``sequence_ids``, saves building it again when several models
        run on one batch (distillation's teacher and student)."""
        x_BTD = self.embeddings(input_ids, token_type_ids, position_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.packed_attention not in PACKED_ATTENTION:
            raise ValueError(f"packed_attention {self.packed_attention!r}: expected one of {PACKED_ATTENTION}")
        if sequence_ids is not None and self.packed_attention == "sentences":
            keep_B1QT = sentence_buckets if sentence_buckets is not None else SentenceBuckets.build(sequence_ids)
        else:
            keep_B1QT = attention_keep(attention_mask, sequence_ids)
        hidden = [x_BTD] if output_hidden_states else None
        scores = [] if output_attention_scores else None
        for layer in self.encoder.layer:
            x_BTD, layer_scores = layer(x_BTD, keep_B1QT, output_attention_scores)
            if hidden is not None:
                hidden.append(x_BTD)
            if scores is not None:
                scores.append(layer_scores)
        return EncoderOutput(x_BTD, tuple(hidden) if hidden else None, tuple(scores) if scores else None)


def attention_keep(attention_mask_BT: torch.Tensor, sequence_ids_BT: torch.Tensor | None) -> torch.Tensor:
    """Boolean attention mask, True where a query may attend to a key (what SDPA takes as ``attn_mask``).

    Without ``sequence_ids_BT``: a key mask [B, 1, 1, T] from ``attention_mask_BT`` (padding keys masked).
    With it: a block-diagonal mask [B, 1, T, T], key j visible to query i when both belong to the same
    sentence (equal nonzero ids). A query that would see no key (a padding query of packed rows, every query of
    an all-padding row) sees every key instead: its output is never used, and no row is left empty, which some
    attention kernels turn into NaN that spreads through the next layer. A boolean mask rather than an
    additive one: ``finfo.min`` added to the scores overflows to -inf in fp16 (and under fp16 autocast).
    """
    if sequence_ids_BT is None:
        keep = attention_mask_BT[:, None, None, :].bool()
    else:
        keep = same_sequence_pairs(sequence_ids_BT)[:, None]
    return keep | ~keep.any(dim=-1, keepdim=True)


def same_sequence_pairs(sequence_ids_BT: torch.Tensor) -> torch.Tensor:
    """[B, T, T] bool: (query i, key j) belong to one sentence. ``sequence_ids_BT`` holds 0 at padding and equal
    positive ids for the tokens of one sentence; a 0/1 attention mask is the one-sentence-per-row case."""
    return (sequence_ids_BT[:, :, None] == sequence_ids_BT[:, None, :]) & (sequence_ids_BT[:, None, :] > 0)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x_ND)))


class BertLMPredictionHead(nn.Module):
    """``cls.predictions``: transform, then the decoder tied to the word embeddings, plus a bias."""

    def __init__(self, cfg: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        # The same Parameter object as the input embeddings (tied), registered here too so that ZeRO-3
        # gathers it when this module runs.
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x_ND)) + self.bias


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg, word_embeddings)


class BertForMaskedLM(nn.Module):
    """Encoder + masked-positions-only MLM head (HF ``BertForMaskedLM`` names: ``bert.*``, ``cls.*``)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg)  # initialised by its own constructor
        self.cls = BertOnlyMLMHead(cfg, self.bert.embeddings.word_embeddings)
        self.cls.apply(partial(init_bert_weights, std=cfg.initializer_range))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                predicted: torch.Tensor | None = None, output_hidden_states: bool = False,
                output_attention_scores: bool = False, position_ids: torch.Tensor | None = None,
                sequence_ids: torch.Tensor | None = None,
                sentence_buckets: SentenceBuckets | None = None) -> MLMOutput:
        """``labels`` [B,T] hold -100 where nothing is predicted; ``predicted`` overrides where logits are
        computed (default: ``labels != -100``; all positions if neither is given): a [B, T] bool mask, or [N] long
        flat positions computed on the host (see :func:`gather_predicted`). Packed rows pass ``position_ids``,
        ``sequence_ids`` and optionally ``sentence_buckets`` (see :meth:`BertModel.forward`)."""
        enc = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states, output_attention_scores,
                        position_ids, sequence_ids, sentence_buckets)
        if predicted is None:
            predicted = labels.ne(-100) if labels is not None else torch.ones_like(input_ids, dtype=torch.bool)
        logits_NV = self.cls.predictions(gather_predicted(enc.last_hidden_state, predicted))
        loss = masked_lm_loss(logits_NV, gather_predicted(labels, predicted)) if labels is not None else None
        return MLMOutput(loss, logits_NV, predicted, enc)

    # ---- Hugging Face directories -------------------------------------------------------------------

    def save_pretrained(self, directory: Path | str, state_dict: dict[str, torch.Tensor] | None = None,
                        special_token_ids: dict[str, int] | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` loadable by ``AutoModelForMaskedLM``.

        ``state_dict`` lets a caller pass weights gathered elsewhere (ZeRO-3) in this module's naming;
        ``special_token_ids``: the config fields of the tokenizer saved with it (see :meth:`BertConfig.to_hf_dict`)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        # The decoder weight is the word embedding (tied): HF re-ties it on load from tie_word_embeddings.
        tensors = {name: t.detach().to("cpu", torch.float32).clone() for name, t in state.items()
                   if name != TIED_DECODER}
        tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"].clone()
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        with open(directory / "config.json", "w", encoding="utf-8") as f:
            json.dump(self.config.to_hf_dict(special_token_ids), f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: Path | str, **config_overrides) -> "BertForMaskedLM":
        """Load a BERT checkpoint directory, read by ``transformers`` (see :func:`load_hf_state_dict`: any
        layout it loads works). ``config_overrides`` replace fields of the directory's config (e.g. dropout).

        ``BertForMaskedLM`` and ``BertForPreTraining`` checkpoints bring their MLM head; a bare ``BertModel``
        has none: the head stays freshly initialised and ``model.has_mlm_head`` is False.
        Raises FileNotFoundError (no directory, config.json or weights) and ValueError naming the directory
        (not a BERT checkpoint, a shape or activation this model lacks, encoder weights missing)."""
        directory = Path(directory)
        model = cls(replace(read_hf_config(directory), **config_overrides))
        state = load_hf_state_dict(directory)
        own = model.state_dict()
        mapped = {k: v for k, v in state.items() if k in own and k != TIED_DECODER}
        missing = [k for k in own if k not in mapped and k != TIED_DECODER]
        if [k for k in missing if not k.startswith("cls.")]:
            raise UsageError(f"{directory}: checkpoint lacks encoder weights, e.g. {missing[:3]}")
        model.load_state_dict(mapped, strict=False)
        model.has_mlm_head = not missing
        return model

    has_mlm_head: bool = True


TIED_DECODER = "cls.predictions.decoder.weight"


def gather_predicted(x_BT: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """The entries of ``x_BT`` ([B, T, ...]) at the predicted positions, in row-major order: ``predicted`` is a
    [B, T] bool mask (``x_BT[predicted]``, whose size depends on the mask's values, so a GPU run waits for them)
    or [N] long flat positions ``row * T + t`` computed on the host (no wait; see :func:`ds_kd.train.loop.host_layout`)."""
    if predicted.dtype == torch.bool:
        return x_BT[predicted]
    return x_BT.flatten(0, 1).index_select(0, predicted)


def masked_lm_loss(logits_NV: torch.Tensor | None, labels_N: torch.Tensor,
                   denominator: torch.Tensor | float | None = None,
                   log_probs_NV: torch.Tensor | None = None) -> torch.Tensor:
    """MLM cross-entropy of the N predicted positions, in float32: the sum over them divided by
    ``denominator`` (default N, i.e. the mean; a count of 0 divides by 1; see :func:`divide_by_count`).

    ``logits_NV`` [N, V] are the logits at the predicted positions, ``labels_N`` [N] their token ids (-100
    entries are ignored); ``log_probs_NV``, the log-softmax of the logits computed already, may replace them.
    The training loop passes the masked-token count of the whole global batch as ``denominator`` (see
    :func:`ds_kd.train.loop.loss_denominators`), so micro-batch and rank splits do not change the objective.
    """
    if log_probs_NV is None:
        log_probs_NV = logits_NV.float().log_softmax(-1)
    total = F.nll_loss(log_probs_NV, labels_N, reduction="sum")
    return divide_by_count(total, labels_N.ne(-100).sum() if denominator is None else denominator)


def divide_by_count(total: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
    """``total / count`` in ``total``'s dtype, dividing by 1 where the count is 0. A Python number (the training
    loop's global counts) divides directly: no copy to the device, no cast to a half-precision tensor."""
    if not torch.is_tensor(count):
        return total / (count if count > 0 else 1)
    count = count.to(total.dtype)
    return total / torch.where(count > 0, count, torch.ones_like(count))


def read_hf_config(directory: Path | str) -> BertConfig:
    """The :class:`BertConfig` of a checkpoint directory's ``config.json``.

    Raises FileNotFoundError when the directory or its config.json is missing, ValueError naming the directory
    when the config is not a BERT one this model can run (``model_type``, ``hidden_act``, position embeddings)."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: checkpoint directory does not exist")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not a checkpoint directory (no config.json)")
    try:
        return BertConfig.from_hf_dict(read_json(cfg_path))
    except (ValueError, TypeError) as e:
        raise UsageError(f"{directory}: {e}") from None


def load_hf_state_dict(directory: Path | str) -> dict[str, torch.Tensor]:
    """The tensors a BERT checkpoint directory holds, in this module's naming (``bert.*``, ``cls.*``).

    Read by ``transformers.BertForMaskedLM.from_pretrained`` from local files only, so every layout that
    transformers loads works: ``model.safetensors`` or ``pytorch_model.bin``, either sharded with its
    ``*.index.json``, old-style ``LayerNorm.gamma/beta`` names, and ``BertModel``, ``BertForMaskedLM`` or
    ``BertForPreTraining`` checkpoints (pooler and next-sentence head are dropped). Tensors the checkpoint lacks
    (the MLM head of a ``BertModel``) are left out, not randomly filled. Raises as :func:`read_hf_config`, and
    ValueError for a decoder not tied to the word embeddings (this model ties them)."""
    import transformers

    directory = Path(directory)
    read_hf_config(directory)  # a clear error for a missing or non-BERT directory before transformers reads it
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report lists the pooler etc.; has_mlm_head says it
    try:
        config = transformers.BertConfig.from_dict(read_json(directory / "config.json"))  # BOM-tolerant read
        hf, info = transformers.BertForMaskedLM.from_pretrained(str(directory), config=config, local_files_only=True,
                                                                output_loading_info=True)
    except OSError as e:
        raise FileNotFoundError(f"{directory}: {e}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = set(info["missing_keys"])
    state = {k: v for k, v in hf.state_dict().items() if k not in missing}
    decoder, embeddings = state.get(TIED_DECODER), state["bert.embeddings.word_embeddings.weight"]
    if decoder is not None and not torch.equal(decoder, embeddings):
        raise UsageError(f"{directory}: the MLM decoder is not tied to the word embeddings "
                         "(tie_word_embeddings false); this model ties them")
    return state


def count_parameters(model: nn.Module, with_embeddings: bool = True) -> int:
    """Parameters of the encoder (the MLM head's tied decoder counted once), optionally without embeddings."""
    return sum(p.numel() for name, p in model.named_parameters()
               if with_embeddings or ".embeddings." not in f".{name}")
