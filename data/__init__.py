"""TFDS dataset builders for llama-jax, built in `array_record` format without TensorFlow.

`text_files.TextFiles` turns local text or JSONL files (default: the Python standard library's
own sources, present on every machine) into documents with a `train` and a `validation` split.
`llama_jax.data` reads them back through `tfds.data_source` and Grain.
"""
