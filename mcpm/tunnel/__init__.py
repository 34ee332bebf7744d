"""ModelTunnel v2 (training spec section 2): muP proxy searches, the lr-transfer check, a
ScalingBench-style indicator, and scaling-law fits from WSD branch decays.

``from mcpm import tunnel``: the fits (:func:`fit_scaling_law`, :func:`fit_sigmoid`) load
here; the sweeps (:func:`run_search`, :func:`run_transfer`, :func:`run_scale`,
:func:`run_trial`) and the indicator (:func:`indicator_loss`, :func:`downstream_accuracy`)
load on first use, so importing the package stays light.
"""
from mcpm.tunnel.fit import FitError, ScalingFit, SigmoidFit, fit_scaling_law, fit_sigmoid
from mcpm.tunnel.proxy import at_width, non_embedding_params, with_hparams

_LAZY = {"run_search": "search", "run_transfer": "transfer", "run_scale": "scale",
         "run_trial": "trial", "indicator_loss": "indicator",
         "indicator_loss_of_checkpoint": "indicator", "downstream_accuracy": "tasks",
         "downstream_accuracy_of_checkpoint": "tasks"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"mcpm.tunnel.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'mcpm.tunnel' has no attribute {name!r}")


__all__ = ["FitError", "ScalingFit", "SigmoidFit", "at_width", "fit_scaling_law",
           "fit_sigmoid", "non_embedding_params", "with_hparams", *_LAZY]
