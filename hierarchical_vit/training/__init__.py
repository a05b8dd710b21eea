"""Training: optimizer, checkpointing, metrics and the train/eval loop."""
