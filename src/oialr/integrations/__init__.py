"""Integrations with other libraries (optional extras; each module imports its library, this package imports
nothing): ``oialr.integrations.transformers`` for the Hugging Face ``Trainer`` and GPT-2's ``Conv1D`` layers
(``pip install oialr[hf]``), ``oialr.integrations.lightning`` for Lightning (``pip install oialr[lightning]``),
``oialr.integrations.hf_conv1d`` for the ``Conv1D`` layer type alone."""
