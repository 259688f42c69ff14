"""ipo_gap: the online-vs-offline alignment study in JAX."""
