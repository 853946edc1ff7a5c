"""Pydantic models of every body the gateway reads or writes, one module per resource."""
