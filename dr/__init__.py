"""dr context."""
