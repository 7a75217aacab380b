"""Shared machinery for the SimCLR scripts: data, model, loss, checkpoints, plots, CLI helpers."""
