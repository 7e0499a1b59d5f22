"""Experiments: a validated config run as cached stages into an output directory."""

from orthoreg.experiment.config import ExperimentConfig, from_mapping, load_config
from orthoreg.experiment.pipeline import Experiment, summarize

__all__ = ["Experiment", "ExperimentConfig", "from_mapping", "load_config", "summarize"]
