"""Data: manifests (one sample per line), table import, and builders of real data sets (sources/).

Owns what a sample is before any backbone sees it. Imports only the shared utilities
(errors, fileio, names, progress, registry, runtime) and no other subpackage.
"""
