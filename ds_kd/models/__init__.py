"""The encoder (``model``: BERT with packed, block-diagonal attention and its presets), attention backends
(``sentence_attention``), students started from a teacher's weights (``warmstart``), the facts an exported
model directory records about itself (``modeldir``) and how well a model's vocabulary covers a text (``vocab_check``)."""
