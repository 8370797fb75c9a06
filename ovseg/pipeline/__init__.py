"""The pure-torch pipeline: stage interfaces, the segmenter that composes them, windows, vocabulary, protocol.

Nothing here reads files, YAML or knows Lightning: the evaluation harness (`ovseg.evaluation`) and the
front ends (`ovseg.api`, `ovseg.cli`) build on it.
"""
