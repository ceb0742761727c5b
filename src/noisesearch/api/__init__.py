"""The applications that run models: a search job (:func:`generate`), its run folder
(:func:`save_run`, :func:`merge_runs`) and filling a reward pool (``api.pool``)."""
from noisesearch.api.run import Run, generate, merge_runs, save_run

__all__ = ["Run", "generate", "merge_runs", "save_run"]
