"""Files: model and noise-model files written atomically and read safely (no pickles), and the
advisory locks that keep two runs from writing one output."""
