"""The ClientApp: trains the client of its SuperNode's `partition-id` (and holds that partition's data only)."""

from fipa.flower import client_app

app = client_app()
