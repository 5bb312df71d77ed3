"""Cycles protocol server."""
