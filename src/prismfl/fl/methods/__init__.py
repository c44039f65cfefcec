"""Federated methods: the Method interface (base), PRISM and the baselines, and their registry."""
