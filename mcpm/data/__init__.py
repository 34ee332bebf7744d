"""Data: the built-in corpus (more pipelines arrive with the training issue)."""
