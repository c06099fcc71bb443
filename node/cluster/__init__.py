"""Assembling an emulated cluster: platform presets, TP layouts, the DDR store, the inline and
Ray backends, launching Ray."""
