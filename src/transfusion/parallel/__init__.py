"""Parallelism for training: the process group (process_group.py) and parallelize() (parallelize.py).
Applied by the trainer only; inference and evaluation load plain models (checkpoint/export.py)."""
