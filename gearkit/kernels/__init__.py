"""Numeric kernels. `reference` holds the pure-torch versions: the CPU path and the test oracle."""
