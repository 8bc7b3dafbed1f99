"""Training: the Trainer and its checkpoints, several GPUs (DDP), presets, the bundled prior's
initial weights, and multi-channel runs (one HDN per channel)."""
