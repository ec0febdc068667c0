"""The diffusion process, apart from the network: DDPM (schedule.py, the paper's) and rectified flow (flow.py),
their samplers (samplers.py), and the two factories every caller uses."""

from transfusion.config import DiffusionConfig, Objective
from transfusion.diffusion.flow import FlowSchedule
from transfusion.diffusion.samplers import build_sampler
from transfusion.diffusion.schedule import NoiseSchedule

__all__ = ["build_sampler", "build_schedule"]


def build_schedule(dc: DiffusionConfig) -> NoiseSchedule | FlowSchedule:
    """The forward process `diffusion.objective` names: NoiseSchedule (DDPM, the paper's) or FlowSchedule."""
    if dc.objective == Objective.FLOW:
        return FlowSchedule(dc.num_train_steps)
    return NoiseSchedule.from_config(dc)
