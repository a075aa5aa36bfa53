"""uda_ray: Ray-distributed hyperparameter search for unsupervised domain adaptation in segmentation."""

__version__ = "0.1.0"
