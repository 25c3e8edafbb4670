"""omnipeft audio domain."""
