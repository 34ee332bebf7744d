"""Launch-script form of `mcpm train`: pretraining from a config with key=value overrides.

    python experiments/pretrain.py configs/tiny.yaml workdir=runs/tiny steps=300
    # multi-host: the same command on every host, plus
    #   --coordinator HOST0:1234 --num-processes N --process-id I   (or --distributed auto on TPU)

Edit this file's OVERRIDES to pin settings of an experiment in code; command-line overrides
come after them and win.
"""
import sys

from mcpm.cli import main

OVERRIDES: list[str] = []  # e.g. ["train.schedule.decay_shape=cosine", "mesh.fsdp=-1"]

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0].startswith("-"):
        sys.exit(__doc__)
    sys.exit(main(["train", argv[0], *OVERRIDES, *argv[1:]]))
