"""HyDRA's rank machinery: targets and parameter budget, signals, allocation, resizing and scheduling."""
