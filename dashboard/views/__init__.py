"""Page bodies of the dashboard: one module per page, each with a `render()` that reads through `dashboard.data`."""
