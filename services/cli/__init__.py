"""The `tad` command line."""
