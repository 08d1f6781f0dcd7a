"""The keeper: the long-lived process that opens, holds and lends the connections to the SuT."""

from fdkeeper.keeper.server import Keeper  # noqa: F401
