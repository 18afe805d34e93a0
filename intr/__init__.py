"""Modelling package: data, models, training, ranking, extraction (everything that runs a network)."""

__version__ = "0.1.0"
