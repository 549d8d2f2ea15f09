"""Backups of termsys's database: one archive file, verified before it is trusted.

``services`` creates, verifies, restores, lists and prunes; ``archive`` is the file format,
``portable`` the engine-independent data, ``native`` the engine's own copy, ``migrations``
the schema check.
"""
