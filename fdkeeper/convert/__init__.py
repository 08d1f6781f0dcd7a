"""The stateless UDP <-> TCP/TLS converter (`fdkeeper convert`, `--mode udp`).

- routing: the Converter, where each message goes (no sockets; testable);
- links: Link, one kept TCP/TLS connection, and open_link;
- delivery: the attached runs, the queue between runs and the resending towards sipp;
- server: the process, its sockets on the shared reactor; serve() is the library entry;
- control: the control socket and control_request, its client.
"""

from fdkeeper.convert.control import control_request
from fdkeeper.convert.links import Link, open_link
from fdkeeper.convert.routing import Converter, ExpiringMap
from fdkeeper.convert.server import ConverterServer, serve

__all__ = ["Converter", "ConverterServer", "ExpiringMap", "Link", "control_request", "open_link", "serve"]
