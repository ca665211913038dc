"""MeanFlow reproduction library: models, objective, sampling, data, metrics."""
__version__ = "0.1.0"
