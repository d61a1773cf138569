"""The server's persistence: database engine and migrations, tables, queries, blob backends.

Nothing here knows HTTP; everything above (device and admin APIs) reaches the database and the
blob store only through these modules.
"""
