"""omnipeft nlp domain."""
