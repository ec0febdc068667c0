"""Checkpoints: the layout once (layout.py), the training format (dcp.py), the export format and loading for
inference (export.py). This package never imports the trainer; the trainer hands it what to save."""

from transfusion.checkpoint.export import export_from_dcp, load_for_inference, tokenizer_path_for
from transfusion.checkpoint.layout import CheckpointError, find_latest, resolve, verify

__all__ = ["CheckpointError", "export_from_dcp", "find_latest", "load_for_inference", "resolve",
           "tokenizer_path_for", "verify"]
