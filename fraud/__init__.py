"""fraud context."""
