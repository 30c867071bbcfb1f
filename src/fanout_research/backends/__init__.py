"""Engines that run jobs. Kept import-free: the local job supervisor lives in this package."""
