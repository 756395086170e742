"""Toy world v3: 1,200 identities that are not their attributes (see ``vocab`` and ``text``)."""
