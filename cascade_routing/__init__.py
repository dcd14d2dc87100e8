"""cascade-routing: routing, cascading and cascade routing among LLMs under a cost budget."""

__version__ = "0.1.0"
