"""omnipeft diffusion domain."""
