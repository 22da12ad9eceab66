"""The operator side of the fleet: deploys now; the monitor (dashboards, history, alerts) later."""
