"""The device agent: the pipeline, telemetry windows through the outbox, commands, deploy/rollback.

config.py (agent.toml and flags), service.py (the long-running service), commands.py (parsing and
validating command payloads), deploy.py (fetch, verify, swap, health-check, roll back).
"""
