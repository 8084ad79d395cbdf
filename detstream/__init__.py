"""detstream: stream detector frames into compute-node memory and count electrons on the fly."""

__version__ = "0.1.0"
