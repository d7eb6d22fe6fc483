"""Reading the ChatOS store: record shapes, durable cursors, ingest into state, and the feedback sidecar."""
