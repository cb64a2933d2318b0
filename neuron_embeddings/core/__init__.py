"""The method: pure functions on arrays and tensors, model loading and hooks, dataset packing,
settings, SAE maths and synthetic models. Imports neither Prefect nor Zarr (nor any layer above)."""
