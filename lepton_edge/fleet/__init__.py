"""The operator side of the fleet: deploys, and the monitor (ingest, store, alerts, web and terminal
dashboards, Prometheus, Home Assistant) with its simulator; see docs/architecture.md."""
