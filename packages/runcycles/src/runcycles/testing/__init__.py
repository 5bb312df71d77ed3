"""Test helpers for code that uses runcycles (fakes, fixtures, spec contract checks)."""
