"""Sample quality: FID (and IS) with torch-fidelity's Inception against the tier's reference
statistics (reference.py: the refstats stage), and for the tiny tier a Frechet distance in a
digits classifier's features (features.py)."""
from .features import features_stage
from .fid import MetricError, evaluate, evaluate_all, frechet
from .reference import refstats

__all__ = ["MetricError", "evaluate", "evaluate_all", "features_stage", "frechet", "refstats"]
