"""The TCP plugin: SOCKS5 and port-forward front doors, and the TCP splice handler."""
