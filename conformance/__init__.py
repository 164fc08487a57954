"""Conformance suite placeholder."""
