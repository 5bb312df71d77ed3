"""Signed evidence: a verifiable, content-addressed receipt for every budget decision.

(The design is described in full in ``docs/evidence.md``; this is the implementer's summary.)
"""
