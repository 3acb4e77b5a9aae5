"""mqi_async: log-based Monte Carlo dose checks for a proton-therapy clinic, hands-off."""

__version__ = "0.1.0"
