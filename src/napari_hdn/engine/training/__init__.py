"""Training: the Trainer and its checkpoints, several GPUs (DDP), presets and the bundled
prior's initial weights."""
