"""The ServerApp: fipa's round loop (any aggregator, FIPA included) over the SuperNodes, composed from the run
config's `overrides`, writing fipa-train's outputs into `output-dir`."""

from fipa.flower import server_app

app = server_app()
