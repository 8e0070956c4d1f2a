"""Integrations with training frameworks (optional extras): ``oialr.integrations.transformers`` for the Hugging Face
``Trainer`` (``pip install oialr[hf]``), ``oialr.integrations.lightning`` for Lightning (``pip install
oialr[lightning]``). Each module imports its framework; this package imports nothing."""
