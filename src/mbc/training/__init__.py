"""Meta-training: the trainer, its schedule of objectives, presets and resumable state."""
