"""Meta-training: the trainer, its schedule of objectives and resumable state (the presets: mbc.presets)."""
