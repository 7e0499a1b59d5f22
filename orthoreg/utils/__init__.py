"""Small shared helpers: atomic I/O, safe tensor files, provenance and seeding."""
