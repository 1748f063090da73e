"""Experiments that compare training regimes (issue 5): ``w3s-experiment`` and ``w3s-report``.

Every regime's models go through the same post-training job (``post_training.postprocess``) at
every hospital; the report turns the scores into a matrix with mean +- SD over seeds.
"""
