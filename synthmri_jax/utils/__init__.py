"""Small shared helpers (atomic I/O)."""
