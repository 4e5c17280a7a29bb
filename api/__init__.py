"""The outside: HTTP API, command line, and the composition root that wires everything."""
