"""Pallas kernels of mcpm, installed as ``mcpm_kernels`` (see setup.py for why not ``kernels``).

One folder per operation; kernels know arrays and small configs, nothing of the model or trainer:
``infllmv2/`` (InfLLM v2 sparse attention) and ``dense_attention/`` (tiled dense attention).
"""
