"""A run in storage: its checkpoints (layout, verification, saving and restoring on every store, re-sharding), its
metrics history, whether a start continues it, its lease, and what comes out of it (export, pull, the model card)."""
