"""Fleetwatch: real-time telemetry and diagnostics for GPU data centers."""

__version__ = "0.1.0"
