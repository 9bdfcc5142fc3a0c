"""Adapters that map a framework's events onto the framework-free core."""
