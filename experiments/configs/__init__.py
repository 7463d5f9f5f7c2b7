"""Experiment configs: each file's get_config(arg) returns a locked ml_collections.ConfigDict."""
