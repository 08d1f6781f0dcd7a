"""SIP over WebSocket (RFC 7118) as a client speaks it (RFC 6455): the HTTP Upgrade and the frames.

Pure logic, no sockets: the keeper's opening (keeper/opening.py) sends ``handshake_request`` and
checks the server's answer; its links (keeper/tlslink.py) encode each SIP message as one masked
frame and decode what the SuT sends with a bounded ``WsDecoder``. The C pump's twin is
helpers/tlspump/wsframe.c (tests/parity).
"""
