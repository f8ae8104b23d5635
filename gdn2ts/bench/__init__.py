"""Benchmarks that print a table and write their numbers (JSON) with the device and library versions."""
