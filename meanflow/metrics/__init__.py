"""Sample quality: FID (and IS) with torch-fidelity's Inception against the tier's reference
statistics, and for the tiny tier a Frechet distance in a digits classifier's features."""
from .features import features_stage
from .fid import MetricError, evaluate, evaluate_all, frechet

__all__ = ["MetricError", "evaluate", "evaluate_all", "features_stage", "frechet"]
