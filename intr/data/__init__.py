"""Data sets: the synthetic generator and the readers that turn a data set into tables."""
