"""The command-line tools (`chopgrad bench`, `chopgrad probe`, `chopgrad info`) and their machinery.

The tools use the library through chopgrad.api, chopgrad.adapters, chopgrad.kernels,
chopgrad.models and chopgrad.data; the library imports nothing from here.
"""
