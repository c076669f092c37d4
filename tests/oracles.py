"""Compatibility: the oracles live in `gradflow.analysis.closed_forms`."""

from gradflow.analysis.closed_forms import *  # noqa: F403
