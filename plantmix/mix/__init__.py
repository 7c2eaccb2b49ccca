"""Mixing (DESIGN §5): the spec, the deterministic selection, shards, the dataset card, verify."""
