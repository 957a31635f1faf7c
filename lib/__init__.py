"""The library the scripts share: one module per mechanism, each named for what it holds (README, How to read it)."""
