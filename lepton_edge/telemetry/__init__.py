"""Telemetry over MQTT: topics, versioned payloads, the SQLite outbox, the publisher, health.

Device side: imports neither torch nor TensorFlow. The conventions are in DESIGN.md ("Telemetry").
"""
