"""settlement context."""
