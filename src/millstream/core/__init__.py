"""The lowest layer: Arrow helpers, hashing, key groups, time and durations, task context,
spill and shuffle files. Imports nothing of Millstream but ``errors``."""
