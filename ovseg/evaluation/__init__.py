"""The evaluation harness: method configs, suites, datasets, metrics, the Lightning engine and the run folder.

It turns a method and a suite into per-dataset results; `ovseg.report` reads them.
"""
