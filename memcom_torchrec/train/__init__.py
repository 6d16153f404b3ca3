"""Training: checkpoints, the training loop and its entry point."""
