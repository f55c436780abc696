"""Runtime: task execution, shuffle, spilling, memory accounting, progress."""
