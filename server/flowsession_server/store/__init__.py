"""SQLite store: schema and migrations, the single writer (group commit), and read queries.

``Store`` (in ``store.py``) is the one interface the rest of the server uses, so another backend
(PostgreSQL) can implement the same methods later.
"""
