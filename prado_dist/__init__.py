"""prado_dist: Ray-distributed hyperparameter search for painting-by-artist classification.

Layers, each importing only the ones before it:
data -> models -> engine -> distributed (Ray Train) -> search (Ray Tune) -> CLI modules
(`prado_dist.train`, `prado_dist.tune`, `prado_dist.predict`).
"""

__version__ = "0.1.0"
