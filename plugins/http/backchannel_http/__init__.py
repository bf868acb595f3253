"""The HTTP plugin: HTTP proxy and destinations (gateway), HTTP(S) backends (connector)."""
