"""Training: WSD schedule, muP optimizer, train step and program, checkpoints, the loop."""
from mcpm.train.schedule import decay_start_step, wsd_schedule

__all__ = ["decay_start_step", "wsd_schedule"]
