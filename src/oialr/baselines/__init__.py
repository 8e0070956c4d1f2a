"""Peer low-rank training methods, for comparison with OIALR in the same harness (outside the core; ``galore``
needs the ``lm`` extra: ``pip install 'oialr[lm]'``).

- :class:`FactorizedTraining` (``factorized.py``): every eligible ``W`` becomes two trained factors ``B A`` from
  its SVD, at step 0 (``factorized``, Pufferfish/CoLA-style) or after a full-rank warm-up (``svd-finetune``).
- ``galore.py``: dense weights, AdamW on gradients projected to rank ``r`` (the ``galore-torch`` package).
- :func:`resolve_ranks` (``ranks.py``): the rank of every layer from a fraction, a number or a finished run.

Eligible layers are OIALR's (:func:`oialr.find_layers` with the run's ``OIALRConfig`` targeting rules); the
baselines factor ``nn.Linear`` layers only.
"""
from .factorized import FactorizedTraining, factorize_linear
from .ranks import resolve_ranks

GALORE_PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")    # galore-torch's projection sides

__all__ = ["FactorizedTraining", "factorize_linear", "resolve_ranks", "GALORE_PROJ_TYPES"]
