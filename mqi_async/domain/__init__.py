"""domain layer of mqi_async."""
