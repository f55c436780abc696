"""Expressions, functions, aggregate specs and their compilation to Arrow (above ``core``)."""
