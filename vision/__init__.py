"""omnipeft vision domain."""
