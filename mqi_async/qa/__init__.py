"""Dose checks: the gamma index, RT Dose reading, and the gamma the dose worker runs.

Pure numpy and pydicom: no asyncio, no adapters (an import-linter contract keeps it so).
"""
