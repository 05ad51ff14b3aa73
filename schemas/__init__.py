"""Typed records and on-disk format constants. No I/O lives here."""
