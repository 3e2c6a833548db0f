"""MCP/1: the field-side framing protocol over TCP (spec: /work/shared/spec/MCP.md)."""
