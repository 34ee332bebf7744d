"""A training run in its own process, for faults a test process must not suffer itself:

    python train_fault_worker.py WORKDIR STEPS kill-mid-save STEP   # SIGKILL while STEP saves
    python train_fault_worker.py WORKDIR STEPS sigint-twice K       # two Ctrl-Cs at batch K

Same config and batches as tests/test_train_loop.py's ``config`` and ``CountingSource``.
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_train_loop import config, source  # noqa: E402

from mcpm.train import checkpoints  # noqa: E402
from mcpm.train.loop import train  # noqa: E402

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal
    workdir, steps, mode, at = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    cfg = config(workdir, f"train.steps={steps}")
    signals = None
    if mode == "kill-mid-save":
        save = checkpoints.RunCheckpoints.save

        def save_then_die(self, step, *args, **kwargs):
            save(self, step, *args, **kwargs)   # asynchronous: returns while orbax writes
            if step == at:
                os.kill(os.getpid(), signal.SIGKILL)
        checkpoints.RunCheckpoints.save = save_then_die
    elif mode == "sigint-twice":
        class Twice(type(source(cfg))):
            def __next__(self):
                if self.k == at:
                    os.kill(os.getpid(), signal.SIGINT)
                    os.kill(os.getpid(), signal.SIGINT)
                return super().__next__()
        train(cfg, data=Twice(cfg.data.batch_size, cfg.data.seq_len, cfg.model.vocab_size),
              progress=False)
        sys.exit(0)
    train(cfg, data=source(cfg, signals=signals), progress=False)
