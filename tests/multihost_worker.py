"""One process of tests/test_train_multihost.py: trains with jax.distributed (gloo on
127.0.0.1); the data are this process's rows of a deterministic global batch."""
import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from mcpm.train.loop import train  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_train_loop import CountingSource, config  # noqa: E402


class ProcessRows(CountingSource):
    """This process's contiguous share of CountingSource's global batch."""

    def __next__(self):
        batch = super().__next__()
        n = self.batch // jax.process_count()
        i = jax.process_index()
        return {k: v[i * n:(i + 1) * n] for k, v in batch.items()}


if __name__ == "__main__":
    process_id, num_processes, port, workdir = sys.argv[1:5]
    if int(num_processes) > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                                   num_processes=int(num_processes), process_id=int(process_id))
    from pathlib import Path
    cfg = config(Path(workdir), "train.steps=3", *sys.argv[5:])
    out = train(cfg, data=ProcessRows(cfg.data.batch_size, cfg.data.seq_len,
                                      cfg.model.vocab_size), progress=False)
    print(json.dumps({"devices": jax.device_count(), **out}))
