"""AnyDoor Serve HTTP service."""
