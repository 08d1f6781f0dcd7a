"""The Kamailio configurations of the testbed, as template files in this package.

- ``global.cfg``: the global section both instances share (listen sockets, no DNS,
  connection limits, common modules, the ctl socket); ``tls-listen.cfg`` is added to it
  for a TLS listener;
- ``sut.cfg``: the SuT, a registrar/proxy that reaches users only over their connection;
- ``converter.cfg``: a stateless UDP <-> TCP/TLS converter in front of the SuT;
- ``control-route.cfg``: the test-control request both route blocks start with;
- ``tls-profiles.cfg``: the tls module's own configuration file (tls.cfg).
- ``ws-listen.cfg``: the WS (and WSS) listeners and modules, added to the global section;
  ``ws-routes.cfg``: the SuT's HTTP Upgrade route (subprotocol sip, the WebSocket ports only).

Placeholders are ``{{name}}``; Kamailio's own syntax (``$avp(...)``, ``{ }`` blocks)
needs no escaping. `render` fails on a placeholder without a value.
"""

from __future__ import annotations

import re
from importlib import resources

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def template(name: str) -> str:
    """The text of template `name` (e.g. "sut.cfg"), from the installed package."""
    return resources.files(__name__).joinpath(name).read_text()


def render(name: str, /, **values: object) -> str:
    """Template `name` with every ``{{key}}`` replaced by ``str(values[key])``."""

    def value_of(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"{name}: no value for {{{{{key}}}}}")
        return str(values[key])

    return _PLACEHOLDER.sub(value_of, template(name))


# Every line the configurations log on purpose starts with this, so tests can grep.
LOG_TAG = "fdkeeper-sut:"
