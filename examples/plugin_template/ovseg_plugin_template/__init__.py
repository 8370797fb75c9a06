"""Example ovseg plugin. Importing it stays cheap: the predictor module is loaded by its entry point."""
