"""The version of ``plan.json``'s layout, in a module of its own: ``flexc inspect`` reads plans without torch."""

SCHEMA_VERSION = 1
"""Bumped whenever a key of ``plan.json`` changes meaning or moves."""
