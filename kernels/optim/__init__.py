"""Optimizers: AdamW with 32-bit or 8-bit blockwise state, with optional paging of the state."""
