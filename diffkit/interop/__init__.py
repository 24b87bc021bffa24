"""Interoperability with other libraries' model folders (diffusers), both ways; no network."""
