"""Windflow: a runtime for real-time interactive video and world models."""

__version__ = "0.1.0"
