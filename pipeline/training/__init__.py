"""The training loop and what it is made of: step plan, checkpoints, the model bundle."""
