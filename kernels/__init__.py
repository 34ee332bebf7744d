"""Pallas kernels of mcpm, installed as ``mcpm_kernels`` (see setup.py for why not ``kernels``).

One folder per operation; kernels know arrays and small configs, nothing of the model or trainer.
InfLLM v2 arrives with issue 3.
"""
