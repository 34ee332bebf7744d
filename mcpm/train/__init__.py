"""Training: the WSD schedule (schedule.py); the sharded loop is issue 4, in progress."""
from mcpm.train.schedule import decay_start_step, wsd_schedule

__all__ = ["decay_start_step", "wsd_schedule"]
