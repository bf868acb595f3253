"""RFC plugin: a pyrfc-compatible client and a simulated ABAP system."""
