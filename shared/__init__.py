"""lmforge.shared: the small core every lmforge tool is built on.

No Typer here and nothing printed to stdout; tools/ turns these functions into commands.
"""

__version__ = "0.1.0"
