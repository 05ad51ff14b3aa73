"""Stores on any fsspec URL. The only package that knows paths and file formats."""
