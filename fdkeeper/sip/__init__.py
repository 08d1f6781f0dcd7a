"""SIP text: stream framing, message parsing and editing, addresses in headers."""
