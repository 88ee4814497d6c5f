"""Curating a collection before training: per-sample scores over its embeddings (`clipkit score`), near-duplicate
groups, and a rule over those columns that keeps a subset (`clipkit filter`), as a key list training reads
(`data.keep_keys`) or as new shards.

Imports neither Accelerate nor Hydra: `clipkit score` passes ranks and the barrier in, as `clipkit embed` does.
"""
