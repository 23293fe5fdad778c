"""Benchmarks of ddpm against diffusers; the command line is benchmarks/run.py."""
