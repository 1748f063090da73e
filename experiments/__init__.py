"""The research harness: training regimes compared (``w3s-experiment``, ``w3s-report``), ablations.

Every regime's models go through the same post-training job (``post_training.postprocess``) at
every hospital; the report turns the scores into a matrix with mean +- SD over seeds.
"""
