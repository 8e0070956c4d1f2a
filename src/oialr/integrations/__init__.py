"""Integrations of oialr with other libraries (each module imports its library; install the matching extra)."""
