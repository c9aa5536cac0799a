"""One task model over any BERT encoder; the head is chosen by the task kind (``ds_kd.data.tasks.TaskSpec.kind``).

- ``pair`` (XNLI, PAWS-X): [CLS] -> pooler -> classes. Our exports have no pooler and HF checkpoints carry a
  pre-trained one (trained on NSP); a freshly initialised dense+tanh pooler for every encoder treats both alike.
- ``tagging`` (WikiANN): a linear layer on every position; loss and prediction on each word's first sub-word.
- ``intent_slot`` (MultiATIS++): intent from the pooled [CLS], slots as tagging; the loss is their sum.
- ``parse`` (mTOP): ``PointerDecoder`` over the encoder states (3 layers, the encoder's width and head count,
  a 512-wide feed-forward), trained with teacher forcing, decoded greedily or by beam search.

``TaskModel.forward`` returns a ``TaskOutput`` holding the task logits with a mask of where they are
meaningful, so that a second-stage distillation can put a soft cross-entropy on them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ds_kd.finetune.data import IGNORE, PAD, TaskLabels
from ds_kd.finetune.pointer import PointerDecoder
from ds_kd.models.model import BertConfig, BertModel, EncoderOutput
from ds_kd.schema import config_special_ids, tokenizer_special_ids
from ds_kd.models.modeldir import DS_KD_KEY

KINDS = ("pair", "tagging", "intent_slot", "parse")


@dataclass
class TaskOutput:
    """What ``TaskModel.forward`` returns."""

    loss: torch.Tensor | None
    """Task loss (sum of the cross-entropies of every logits entry), when labels were given."""
    logits: dict[str, torch.Tensor]
    """``classes`` [B, C] (pair); ``intents`` [B, I]; ``tags`` [B, T, S] (tagging, intent_slot);
    ``parse`` [B, U, V + T] (ontology vocabulary then one pointer per encoder position)."""
    masks: dict[str, torch.Tensor]
    """Per logits entry, a bool mask over its leading dims: where the logits count (word starts, target steps)."""
    encoder: EncoderOutput
    """The encoder's output (hidden states / attention scores when asked for)."""


class Pooler(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden_BTD[:, 0]))


class TaskModel(nn.Module):
    """``encoder`` (a ``BertModel``) plus the head of ``kind``, sized by ``labels``.

    ``segment_ids_trained``: whether the encoder learnt segment ids (``ds_kd.models.modeldir.segment_ids_trained`` of
    its directory). When it did not (our exports), the encoder sees segment id 0 for both sentences of a pair,
    whatever ``token_type_ids`` the batch holds (the RoBERTa / XLM-R convention); when it did, the batch's 0/1."""

    def __init__(self, encoder: BertModel, kind: str, labels: TaskLabels, dropout: float = 0.1,
                 decoder_layers: int = 3, decoder_ffn: int = 512, max_target_len: int = 256,
                 segment_ids_trained: bool = True):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown task kind {kind!r}; known: {', '.join(KINDS)}")
        cfg = encoder.config
        self.encoder, self.kind, self.labels = encoder, kind, labels
        self.segment_ids_trained = segment_ids_trained
        self.head_args = {"dropout": dropout, "decoder_layers": decoder_layers, "decoder_ffn": decoder_ffn,
                          "max_target_len": max_target_len}
        self.dropout = nn.Dropout(dropout)
        if kind in ("pair", "intent_slot"):
            self.pooler = Pooler(cfg.hidden_size)
            self.classifier = nn.Linear(cfg.hidden_size, len(labels.classes))
        if kind in ("tagging", "intent_slot"):
            self.tagger = nn.Linear(cfg.hidden_size, len(labels.tags))
        if kind == "parse":
            self.decoder = PointerDecoder(cfg.hidden_size, cfg.num_attention_heads, len(labels.decoder_vocab),
                                          decoder_layers, decoder_ffn, dropout, max_target_len)
        for name, module in self.named_children():
            if name != "encoder":
                module.apply(self._init_head)

    def _init_head(self, module: nn.Module) -> None:
        std = self.encoder.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def segments(self, token_type_ids_BT: torch.Tensor | None) -> torch.Tensor | None:
        """The segment ids [B, T] the encoder gets: the batch's, or all zeros for an encoder that never learnt
        segment ids."""
        if self.segment_ids_trained or token_type_ids_BT is None:
            return token_type_ids_BT
        return torch.zeros_like(token_type_ids_BT)

    def head_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("encoder.")]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, word_start_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, intent_labels: torch.Tensor | None = None,
                target_in: torch.Tensor | None = None, target_out: torch.Tensor | None = None,
                output_hidden_states: bool = False, output_attention_scores: bool = False,
                position_ids: torch.Tensor | None = None, sequence_ids: torch.Tensor | None = None) -> TaskOutput:
        """``labels``: [B] classes (pair) or [B, T] tags with -100 off word starts; ``intent_labels`` [B];
        ``target_in``/``target_out`` [B, U] decoder inputs / next-token ids (-100 padded). Without
        ``target_in`` a parse model returns no logits (decode with ``decode``). Packed rows of several sentences
        (unlabelled transfer text) pass ``position_ids`` and ``sequence_ids`` [B, T] (``ds_kd.models.model.BertModel``):
        per-token logits are then those of each sentence alone."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        enc = self.encoder(input_ids, attention_mask, self.segments(token_type_ids), output_hidden_states,
                           output_attention_scores, position_ids=position_ids, sequence_ids=sequence_ids)
        hidden_BTD = enc.last_hidden_state
        logits, masks, targets = {}, {}, {}
        num = input_ids.shape[0]
        ones_B = torch.ones(num, dtype=torch.bool, device=input_ids.device)
        if self.kind in ("pair", "intent_slot"):
            key = "classes" if self.kind == "pair" else "intents"
            logits[key] = self.classifier(self.dropout(self.pooler(hidden_BTD)))
            masks[key] = ones_B
            targets[key] = labels if self.kind == "pair" else intent_labels
        if self.kind in ("tagging", "intent_slot"):
            logits["tags"] = self.tagger(self.dropout(hidden_BTD))
            masks["tags"] = word_start_mask if word_start_mask is not None else attention_mask.bool()
            targets["tags"] = labels
        if self.kind == "parse" and target_in is not None:
            pointer_mask = word_start_mask if word_start_mask is not None else attention_mask.bool()
            logits["parse"] = self.decoder(target_in, hidden_BTD, attention_mask, pointer_mask)
            masks["parse"] = target_in.ne(PAD)  # step 0 holds [BOS]
            targets["parse"] = target_out
        loss = None
        given = {k: t for k, t in targets.items() if t is not None}
        if given:
            loss = sum(F.cross_entropy(logits[k].float().flatten(0, -2), t.flatten(), ignore_index=IGNORE)
                       for k, t in given.items())
        return TaskOutput(loss, logits, masks, enc)

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, word_start_mask: torch.Tensor,
               token_type_ids: torch.Tensor | None = None, beam_size: int = 1, max_steps: int | None = None,
               **_unused) -> list[list[int]]:
        """``parse``: the best decoder ids per example (greedy for ``beam_size=1``); batch keys that only
        training uses (``target_in``...) are ignored."""
        hidden_BTD = self.encoder(input_ids, attention_mask, self.segments(token_type_ids)).last_hidden_state
        return self.decoder.beam_search(hidden_BTD, attention_mask, word_start_mask, beam_size, max_steps)


def freeze_embeddings(model: TaskModel) -> int:
    """Freeze the encoder's embedding layers (word, position, token type and their LayerNorm), as the paper
    does so that only the sub-words seen in English training would not drift; returns the frozen count."""
    frozen = 0
    for p in model.encoder.embeddings.parameters():
        p.requires_grad_(False)
        frozen += p.numel()
    return frozen


TASK_MODEL_JSON = "task_model.json"
TASK_MODEL_WEIGHTS = "task_model.safetensors"


def save_task_model(model: TaskModel, directory: Path | str, tokenizer=None, **info) -> None:
    """Write the whole task model (``task_model.safetensors`` + ``task_model.json`` + the encoder's
    ``config.json``, with its ``ds_kd.segment_ids_trained`` record) and, if given, the tokenizer, so
    ``load_task_model`` rebuilds it (a fine-tuned teacher)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / TASK_MODEL_WEIGHTS), metadata={"format": "pt"})
    # config.json carries the special ids of the tokenizer saved with it (an older export may say otherwise)
    roles = tokenizer_special_ids(tokenizer) if tokenizer is not None else {}
    special = config_special_ids(roles) if "pad" in roles else None
    encoder_config = model.encoder.config.to_hf_dict(special)
    meta = {"kind": model.kind, "labels": model.labels.to_dict(), "head": model.head_args,
            "segment_ids_trained": model.segment_ids_trained, "encoder_config": encoder_config, **info}
    (directory / TASK_MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    config = {**encoder_config, DS_KD_KEY: {"segment_ids_trained": model.segment_ids_trained}}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        from ds_kd.data.tokenizer_files import save_tokenizer_files

        save_tokenizer_files(tokenizer, directory, model.encoder.config.max_position_embeddings)


def load_task_model(directory: Path | str) -> tuple[TaskModel, dict]:
    """A ``TaskModel`` saved by ``save_task_model`` and its ``task_model.json``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / TASK_MODEL_JSON
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: not a fine-tuned task model directory (run launch/finetune.py "
                                f"with --save-model)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    encoder = BertModel(BertConfig.from_hf_dict(meta["encoder_config"]))
    # A task model saved before the flag existed was fine-tuned with segments 0/1.
    model = TaskModel(encoder, meta["kind"], TaskLabels.from_dict(meta["labels"]), **meta["head"],
                      segment_ids_trained=meta.get("segment_ids_trained", True))
    model.load_state_dict(load_file(str(directory / TASK_MODEL_WEIGHTS)))
    return model, meta
