"""hpc layer of mqi_async."""
