"""Training: the loop (loop.py), one optimiser step (step.py), the optimiser (optim.py) and the EMA (ema.py)."""

from transfusion.train.loop import TrainingDiverged, train

__all__ = ["TrainingDiverged", "train"]
