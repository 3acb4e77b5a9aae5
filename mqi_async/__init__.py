"""mqi_async: log-based Monte Carlo dose checks for a proton-therapy clinic, hands-off."""

import warnings

# asyncssh >= 2.24 touches cryptography's deprecated DSA names at import (cryptography >= 51);
# the service never offers or accepts DSA keys, and the note would land on every command's stderr
warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"asyncssh(\.|$)")

__version__ = "0.1.0"
