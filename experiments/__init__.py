"""Experiments: the absl launchers and the get_config(arg) files they load."""
