"""Training and prediction data: arrays checked and normalised, 2D frames read on demand
from whatever holds them."""
