"""engine layer of mqi_async."""
