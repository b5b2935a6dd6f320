"""Integrations with other libraries. Each submodule imports its library only when it is imported itself."""
