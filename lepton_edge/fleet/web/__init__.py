"""The monitor's web dashboard: `create_app(store, token=..., command_sender=...)` and its static page."""
from lepton_edge.fleet.web.app import WebServer, check_bind, create_app, new_token

__all__ = ["create_app", "check_bind", "new_token", "WebServer"]
