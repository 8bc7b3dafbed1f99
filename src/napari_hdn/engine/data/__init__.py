"""Training and prediction data: arrays checked and normalised, 2D frames read on demand from
whatever holds them, where the channels of an image are, and TIFF / OME-Zarr reading and writing."""
