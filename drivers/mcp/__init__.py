"""MCP/1: the field-side framing protocol over TCP (described in docs/mcp.md)."""
