"""mcpm: MiniCPM4 in JAX. Install for CPU with `pip install -e ".[test]"`.

The distribution is called ``mcpm-jax`` (``mcpm`` on PyPI is an unrelated tool); the import
names are ``mcpm`` and ``mcpm_kernels``. The Pallas kernels live in the top-level ``kernels/``
folder of this repository but are installed as ``mcpm_kernels``: the name ``kernels`` belongs
to another PyPI package that ``transformers`` imports when it is present.
"""
from setuptools import setup

setup(
    name="mcpm-jax",
    version="0.1.0",
    description="MiniCPM4 in JAX/Flax NNX: exact official-checkpoint interop, InfLLM v2, training",
    python_requires=">=3.11",
    packages=["mcpm", "mcpm.model", "mcpm.data", "mcpm.train", "mcpm.tunnel", "mcpm.quant",
              "mcpm_kernels", "mcpm_kernels.infllmv2", "mcpm_kernels.dense_attention",
              "mcpm_kernels.ternary"],
    package_dir={"mcpm": "mcpm", "mcpm_kernels": "kernels"},
    # the generated indicator and downstream sets that `mcpm tunnel` uses by default
    package_data={"mcpm.tunnel": ["data/*.jsonl", "data/README.md"]},
    install_requires=[
        "jax>=0.10.2,<0.13",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "tensorflow-datasets>=4.9.10,<5",
        # TFDS builders import it on Python >= 3.9 too, but TFDS only requires it below 3.9
        "importlib_resources>=5",
        "pyarrow>=14",  # parquet data sources
        "sentencepiece>=0.2,<0.3",
        "safetensors>=0.7,<1",
        "ml_dtypes>=0.5",
        "numpy>=2.0,<3",
        "pyyaml>=6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboardX>=2.6,<3",
        "optuna>=4.2,<6",  # mcpm tunnel search (RDB storage: SQLite by default)
        "scipy>=1.11,<2",  # scaling-law and sigmoid fits
        "threadpoolctl>=3.1,<4",  # one BLAS thread for scipy's tiny fits (else 10x slower)
        "gguf>=0.19,<0.20",  # mcpm quant gguf: llama.cpp's file format (TQ1_0/TQ2_0 ternary types)
    ],
    extras_require={
        # libtpu gives the TPU topology descriptions the Pallas kernels are AOT-compiled against in
        # the tests (no TPU needed; run CPU work with JAX_PLATFORMS=cpu when it is installed);
        # pytest-xdist runs the suite on every core (most of its time is single-threaded compiles)
        "test": ["pytest>=8", "pytest-xdist>=3.5,<4", "libtpu==0.0.52"],
        "tpu": ["jax[tpu]>=0.10.2,<0.13"],
        "gpu": ["jax[cuda12]>=0.10.2,<0.13"],
        # experiments/bench_official_cpu.py: the official PyTorch modeling code's stack
        "official": ["torch>=2.4,<2.15", "transformers>=4.48,<4.49"],
        # experiments/llamacpp_check.py: llama.cpp loads mcpm's GGUF exports
        "llamacpp": ["llama-cpp-python>=0.3.36,<0.4"],
    },
    entry_points={"console_scripts": ["mcpm=mcpm.cli:main"]},
)
