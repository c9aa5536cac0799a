"""ds-kd: DeepSpeed multilingual BERT pretraining, online distillation and zero-shot evaluation.

The packages, in the order of the pipeline (each imports only those before it; ``tests/project/test_imports.py``):
core modules here (``errors``, ``manifest``, ``schema``, ``logbook``, ``textfile``) -> ``data`` -> ``models`` ->
``train`` -> ``distill`` -> ``finetune`` -> ``eval``; ``cli`` (what the commands in ``launch/`` and ``data_prep`` share) sits above ``train``.
"""

__version__ = "0.1.0"
