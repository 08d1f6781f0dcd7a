"""The stateless UDP <-> TCP/TLS converter (`fdkeeper convert`, `--mode udp`)."""

from fdkeeper.convert.converter import *  # noqa: F401,F403  (split into modules by the restructure)
from fdkeeper.convert.converter import Converter, Link, control_request, parse_hostport, serve  # noqa: F401
