"""Benchmarks of the emulator itself (`make bench`); a package so tests can import its pure parts."""
