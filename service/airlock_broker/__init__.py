"""Airlock's broker: admission, sandbox runs, output validation, result streaming."""
