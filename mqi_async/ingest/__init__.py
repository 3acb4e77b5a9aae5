"""ingest layer of mqi_async."""
