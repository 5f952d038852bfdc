"""The click commands only: each parses its options and calls one library function."""
