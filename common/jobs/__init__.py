"""Command-line jobs a hospital runs on its own machine after federated training.

``w3s-postprocess`` (maps -> pseudo-masks -> segmenter -> metrics) and ``w3s-predict``
(segment new images). Only their metrics are meant to leave the site.
"""


class JobError(Exception):
    """A problem with the job's inputs that the user can fix; shown without a traceback."""
