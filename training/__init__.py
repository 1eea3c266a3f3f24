"""modloc training: models, losses, torch data loading and the training loop (needs torch)."""
