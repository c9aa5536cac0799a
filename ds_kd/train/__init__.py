"""Training under DeepSpeed: the process group and engine (``engine``), the DeepSpeed JSON and its overrides
(``ds_config``), optimizer and schedule (``optim``), resumable checkpoints (``checkpoint``), the step loop with
global loss counting (``loop``), one training stage from flags to export (``training``) and MLM pretraining
(``pretrain``)."""
