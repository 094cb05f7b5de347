"""Function-preserving checkpoint surgery with feature sets."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("surgery-pipeline")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
