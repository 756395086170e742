"""Toy text-to-image worlds for measuring concept erasure (evaluation worlds, not the method).

* ``toyworld.v1``: coloured shapes, 8 colours x 4 shapes x 4 background styles (the demo's world).
* ``toyworld.v2``: the mass-erasure proving ground, 200 named identities x 20 art styles.

Both are plain torch and never import ComfyUI; they reach the algorithms in ``mace_ops``
through the same small interfaces (``mace_ops.interfaces``) the ComfyUI adapters implement.
"""
