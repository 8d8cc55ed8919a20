"""The python-backend model template: ``model.py`` is copied verbatim into each version folder.

It runs inside Triton's python backend stub (which provides ``triton_python_backend_utils``), not
in this package's environment; `serving.convert` copies it with ``importlib.resources``.
"""
