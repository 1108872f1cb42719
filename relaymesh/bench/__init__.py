"""``relaymesh bench``: the relay scenario (relay.py) and the mesh scenarios (mesh.py)."""
