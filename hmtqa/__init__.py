"""``hmtqa``: the command line, a face over :mod:`qa_pipeline` like the web app (:mod:`app`).

The layers import downwards only: faces (``app``, ``hmtqa``) -> ``qa_pipeline`` -> ``hmt``
(checked by ``tests/test_layers.py``). Run it as ``hmtqa ...``, ``python -m hmtqa ...`` or
``torchrun --nproc_per_node=N -m hmtqa batch ...``. Kept import-free so that ``--help`` stays fast.
"""
