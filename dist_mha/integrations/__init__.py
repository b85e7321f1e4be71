"""Bridges to other libraries (imported on demand; nothing here is needed by the core)."""
