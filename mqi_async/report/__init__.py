"""The case report: one PDF and one self-contained HTML file that a physicist reviews and signs.

Built from store rows and the dose files, in its own process (`python -m mqi_async.report`),
never on the service's event loop; plots with matplotlib's Agg and PDF backends.
"""
