"""ovseg first-party plugin package ovseg_lposs."""
