"""The sandbox side of Airlock that both the broker and the in-container worker may import.

Everything here is pure standard library and pure data: the host <-> sandbox contract
(paths, exit codes, job spec), the artifact formats and their magic bytes, and the hardening
policy. Nothing in this package ever opens an artifact beyond reading a few leading bytes.
"""
