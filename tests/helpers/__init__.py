"""What the test modules share, imported as ``from helpers.<module> import ...``.

``references``: float64 NumPy references and the tolerances of comparisons with them;
``strategies``: hypothesis strategies for gradient pytrees; ``runs``: drivers of
transformations (steps, scans, ``vmap``, Orbax round trips, Flax NNX, ``shard_map``);
``guards``: the recorded run the tests of both guards replay.
"""
