"""modelnet: a peer-to-peer network of AI models.

The code lives in the repository's top-level folders (``identity/``, ``protocols/``,
``p2p/``, ``models/``, ``cli/``, ``testing/``), mapped into this namespace by setup.cfg.
"""

__version__ = "0.1.0"
