"""The HDN network: its blocks, the ladder VAE, the model a file holds (network, noise model,
normalisation), one model per channel, and reading model files and BMZ packages."""
