"""The users-and-posts domain: tables, queries, key schema, and what invalidates what."""
