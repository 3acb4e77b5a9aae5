"""ui layer of mqi_async."""
