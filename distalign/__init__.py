"""distalign: alignment of language models as distribution learning (arXiv 2506.01523)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("distalign")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
