"""Training command line: datasets, models, the training recipe, results and plots (may use the optional extras)."""
