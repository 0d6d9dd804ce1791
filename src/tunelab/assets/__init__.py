"""Builds the packaged default model and data into a local cache."""
