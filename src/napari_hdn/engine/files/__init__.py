"""Files: model and noise-model files written atomically and read safely, output locks,
TIFF and OME-Zarr image input and output."""
