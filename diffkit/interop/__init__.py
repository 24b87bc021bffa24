"""Interoperability with other libraries' model folders (diffusers), both ways; no network."""
from diffkit.interop.diffusers import Loaded, export, load_diffusers, scheduler_sample

__all__ = ["Loaded", "export", "load_diffusers", "scheduler_sample"]
