"""Prediction: posterior sampling, the MMSE and variance of images and stacks, latent
levels, and chunked out-of-core prediction into zarr stores."""
