"""demo layer of mqi_async."""
