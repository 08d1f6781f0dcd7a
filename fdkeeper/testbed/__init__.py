"""The embedded System under Test: a real Kamailio on loopback, its test PKI and sipp helpers.

Used by `fdkeeper demo`, the test suite and the benches.
"""

from fdkeeper.testbed.kamailio import *  # noqa: F401,F403  (split into modules by the restructure)
from fdkeeper.testbed.kamailio import _as_list, _contact_dict, _format_addr  # noqa: F401
