"""omnipeft medical domain."""
