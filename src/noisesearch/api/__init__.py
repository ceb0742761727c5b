"""The applications that run models: a search job (:func:`generate`, its steps over a
:class:`GenerateConfig`), its run folder (:func:`save_run`, :func:`merge_runs`) and filling a reward
pool (``api.pool``)."""
from noisesearch.api.run import GenerateConfig, Run, generate, merge_runs, run_generate, save_run

__all__ = ["Run", "GenerateConfig", "generate", "run_generate", "merge_runs", "save_run"]
