"""toap-kit."""
