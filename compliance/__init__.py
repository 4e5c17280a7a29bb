"""compliance context."""
