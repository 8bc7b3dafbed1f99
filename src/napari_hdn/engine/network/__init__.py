"""The HDN network: its blocks, the ladder VAE, the model a file holds (network, noise model,
normalisation), and the fused inference path."""
